"""What the absl command lines share: `--config NAME` resolved to a shipped config, Orbax's INFO
logging off unless `-v` is given, and errors a user can act on printed as one `error:` line
(exit 2 when refused before anything ran, 1 when a run failed; TRANSFUSION_DEBUG=1 shows the
traceback instead)."""

import argparse
import contextlib
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from transfusion_jax.config import expand_config_flag
from transfusion_jax.workdir import RunError


def is_user_error(error: BaseException) -> bool:
    """Errors that say what to fix in one line: ours, and checks that name a config field or
    a flag."""
    if os.environ.get("TRANSFUSION_DEBUG"):
        return False
    if isinstance(error, RunError):
        return True
    message = str(error)
    return isinstance(error, ValueError | FileNotFoundError | KeyError) and (
        message.startswith(("config field", "--", "'config field"))
    )


def run(main, define_flags=None) -> None:
    """Runs `main()` (no arguments: it reads absl's FLAGS) as the program, after
    `define_flags()`: a config flag with a default applies the command line's overrides as it is
    defined, so a bad one is refused there."""
    try:
        argv = expand_config_flag(sys.argv)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if define_flags is not None:
        with refused_flags(argv):
            define_flags()

    def program(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # Orbax logs ~60 INFO lines a save
            absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            main()
        except Exception as e:
            if not is_user_error(e):
                raise
            # str() of a KeyError is the repr of its message: print the message itself
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: {message}", file=sys.stderr)
            sys.exit(getattr(e, "exit_status", 2))

    app.run(program, argv=argv, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a refused flag as one `error:` line and exit status 2 (absl
    prints "FATAL Flags parsing error" with exit 1, and lets a `--config.KEY` override naming no
    key escape as a traceback)."""
    with refused_flags(argv):
        return flags.FLAGS(argv)


@contextlib.contextmanager
def refused_flags(argv: list[str]):
    """Flag errors raised inside, as one `error:` line and exit status 2."""
    try:
        yield
    except (flags.Error, KeyError, AttributeError) as e:
        if os.environ.get("TRANSFUSION_DEBUG"):
            raise
        if isinstance(e, flags.Error):  # a bad value, a missing flag, a config that failed to load
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # no traceback
        else:  # ml_collections: a --config.KEY override naming no key
            message = unknown_override(argv, e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def unknown_override(argv: list[str], error: Exception) -> str:
    """The message for a `--config.A.B=V` whose key the config lacks: the flag, ml_collections'
    suggestion when it has one, and where the keys are listed."""
    while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
        error = error.args[0]
    lines = str(error.args[0] if error.args else error).splitlines()
    missing = lines[0].strip("'\"")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    flag = next((a for a in overrides if missing in a.split(".")[1:]), "a --config.KEY override")
    hint = f" ({lines[-1].strip()})" if len(lines) > 1 else ""
    return (
        f"{flag}: the config has no key {missing!r}{hint}; "
        "`python -m transfusion_jax.configs NAME` lists them"
    )


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's --help with each option's default, except where there is none to show (a
    required option, a flag whose absence means "as the run says")."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
