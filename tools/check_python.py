"""Fails early, with a clear message, when the Python running `make` is not 3.11."""

import sys

if sys.version_info[:2] != (3, 11):
    found = ".".join(map(str, sys.version_info[:3]))
    sys.exit(
        f"qn-keras needs Python 3.11 (TensorFlow 2.15.1 wheels exist for 3.9-3.11 and the stack "
        f"is tested on 3.11); found {found} at {sys.executable}. Install Python 3.11 and run "
        f"`make PYTHON=/path/to/python3.11 ...`."
    )
