"""Training data sources. Each yields this process's rows of the global batch as a numpy `Batch`
and has `get_state()` / `set_state()` (JSON-able) so a resumed run continues with the next batch."""

from transfusion_jax.data.synthetic import SyntheticSource

SOURCES = {"synthetic": SyntheticSource}


def make_source(cfg, local_batch_size: int, process_index: int = 0, process_count: int = 1):
    if cfg.data.source not in SOURCES:
        raise ValueError(
            f"config field data.source: {cfg.data.source!r} is not one of {tuple(SOURCES)}"
        )
    return SOURCES[cfg.data.source](cfg, local_batch_size, process_index, process_count)
