"""What the absl command lines share: `--config NAME` resolved to a shipped config, Orbax's INFO
logging off unless `-v` is given, and errors a user can act on printed as one `error:` line
(exit 2 when refused before anything ran, 1 when a run failed; TRANSFUSION_DEBUG=1 shows the
traceback instead)."""

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


def run(main) -> None:
    """Runs `main()` (no arguments: it reads absl's FLAGS) as the program."""
    try:
        argv = expand_config_flag(sys.argv)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

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
            print(f"error: {str(e).strip(chr(39))}", file=sys.stderr)
            sys.exit(getattr(e, "exit_status", 2))

    app.run(program, argv=argv)
