"""Every config key with its value and meaning: python -m transfusion_jax.configs [NAME[:ARG]]."""

import sys

from transfusion_jax.config import base_config, describe, load_config

spec = sys.argv[1] if len(sys.argv) > 1 else None
print(describe(load_config(spec) if spec else base_config()))
