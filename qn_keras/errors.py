"""The project's one distinction between the user's mistakes and its own.

:class:`UserInputError` (a ``ValueError``) means the input was wrong: a file, a flag, a config
value, a manifest line, a request. Its message says what is wrong and what to do, and the ``qn``
command prints it as one line. Any other exception is a bug and keeps its traceback. The
domain errors (``ConfigError``, ``AudioError``, ``TranscriptError``, ``CorruptRecordError``,
``NemoImportError``) are kinds of it.
"""


class UserInputError(ValueError):
    """Input from the user is wrong; the message says what to do about it."""
