"""Every config key with its value and meaning: python -m transfusion_jax.configs [NAME[:ARG]]."""

import argparse
import sys

from transfusion_jax.config import base_config, describe, load_config, shipped_configs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transfusion_jax.configs", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "config",
        nargs="?",
        help=f"a shipped config ({', '.join(shipped_configs())}), with :ARG "
        "(paper:0.76b), or a config file; none: the defaults every config starts from",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else base_config()
    except (FileNotFoundError, ValueError) as e:  # no such config; a bad ARG for it
        parser.exit(2, f"error: {e}\n")
    sys.stdout.write(describe(cfg) + "\n")


if __name__ == "__main__":
    main()
