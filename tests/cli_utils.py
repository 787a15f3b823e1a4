"""Running the `qn` command in-process, its output captured."""

from __future__ import annotations

import contextlib
import io


def run_qn(argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``qn ARGV``."""
    from qn_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()
