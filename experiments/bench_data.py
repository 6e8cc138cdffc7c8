"""Input pipeline throughput: documents/s and packed tokens/s per source.

  python -m experiments.bench_data                       # shapes + the folders in ../shared/data
  python -m experiments.bench_data --threads 2 --batches 50

Uses configs/tiny.py's geometry (32x32 images, rows of 256, 8 rows a batch) unless overridden.
Packed tokens/s counts the real (non-padding) positions of the rows produced; compare it with the
train step's tokens/s (bench_train.py --config configs/tiny.py) to see whether the input keeps up.
"""

import argparse
import pathlib
import statistics
import time

import numpy as np

from transfusion_jax.config import load_config
from transfusion_jax.data import make_source

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(cfg, batches: int, batch_size: int) -> dict:
    source = make_source(cfg, batch_size)
    next(source)  # start-up: opening the source, the first window
    docs = tokens = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(source)
        tokens += int((batch.segment_ids > 0).sum())
        docs += int(sum(len(np.unique(row[row > 0])) for row in batch.segment_ids))
    elapsed = time.perf_counter() - t0
    return {
        "documents_per_s": docs / elapsed,
        "packed_tokens_per_s": tokens / elapsed,
        "fill": tokens / (batches * batch_size * cfg.data.seq_len),
        "skipped": source.skipped_examples,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="0 = the config's")
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sources = [("shapes", {})]
    for name in ("noto_emoji_72", "flickr8k_1k"):
        if (SHARED / name).is_dir():
            sources.append((name, {"source": "imagefolder", "path": str(SHARED / name)}))
    for name, data in sources:
        cfg = load_config(args.config)
        cfg.data.update(data)
        if args.threads:
            cfg.data.num_threads = args.threads
        cfg.data.num_workers = args.workers
        runs = [measure(cfg, args.batches, cfg.train.batch_size) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"source={name} threads={cfg.data.num_threads} workers={args.workers} "
            f"documents_per_s={med['documents_per_s']:.0f} "
            f"packed_tokens_per_s={med['packed_tokens_per_s']:.0f} fill={med['fill']:.3f} "
            f"skipped={med['skipped']:.0f}"
        )


if __name__ == "__main__":
    main()
