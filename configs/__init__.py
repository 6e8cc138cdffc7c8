"""The shipped configs: each file has `get_config(arg=None)`; `--config NAME[:ARG]` finds them."""
