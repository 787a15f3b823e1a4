"""`qn` entry point: every module in qn_cli.commands adds one subcommand.

A command module defines ``register(subparsers)``, which adds its parser and sets
``func=handler`` on it. Heavy imports (TensorFlow, Beam) happen inside handlers so that
``qn --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import qn_cli.commands
from qn_keras.errors import UserInputError


class UserError(UserInputError):
    """An error caused by the user's input; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qn", description="QuartzNet speech recognition for TensorFlow/Keras."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(qn_cli.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"qn_cli.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    return run_command(args.command, args.func, args)


def run_command(name: str, func, args) -> int:
    """Runs a subcommand: the user's mistakes (:class:`UserInputError`, missing or existing
    files) are one line and exit status 2; anything else is a bug and keeps its traceback."""
    try:
        result = func(args)
    except (UserInputError, FileNotFoundError, FileExistsError) as e:
        print(f"qn {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qn {name}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
