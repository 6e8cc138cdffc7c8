"""Training data. `make_source` returns this process's batch iterator for `cfg.data`: numpy
`Batch`es of its rows of the global batch, with `get_state()` / `set_state()` (JSON-able) so a
resumed run continues with the next batch, and `skipped_examples` (records skipped so far)."""

from transfusion_jax.config import resolve_model
from transfusion_jax.data.pipeline import make_pipeline
from transfusion_jax.data.synthetic import SyntheticSource

GRAIN_SOURCES = ("shapes", "imagefolder", "tfds", "text", "cached")
SOURCES = {"synthetic": SyntheticSource}


def make_source(cfg, local_batch_size: int, process_index: int = 0, process_count: int = 1):
    cfg = resolve_model(cfg)  # derived fields (e.g. pixel-space latent size) filled in
    if cfg.data.source in SOURCES:
        return SOURCES[cfg.data.source](cfg, local_batch_size, process_index, process_count)
    if cfg.data.source in GRAIN_SOURCES:
        return make_pipeline(cfg, local_batch_size, process_index, process_count)
    valid = tuple(SOURCES) + GRAIN_SOURCES
    raise ValueError(f"config field data.source: {cfg.data.source!r} is not one of {valid}")
