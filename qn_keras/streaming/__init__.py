"""Streaming transcription: live audio in, partial and final text out.

- :mod:`qn_keras.streaming.normalization`: the rules that replace per-utterance feature
  normalization when the end of the utterance is not known yet, and the feature prior.
- :mod:`qn_keras.streaming.stateful`: the stream step of a limited-look-ahead model, whose
  chunked output equals its offline output.
- :mod:`qn_keras.streaming.recognizer`: :class:`StreamingRecognizer`, ``feed(samples)`` and
  ``finish()`` over either mode (buffered, for any model; stateful).
"""
