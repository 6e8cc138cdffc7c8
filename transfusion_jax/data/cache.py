"""Cache a dataset's latents once, so training reads them instead of decoding images again.

  python -m transfusion_jax.data.cache --config configs/tiny.py \
      --config.data.source=imagefolder --config.data.path=DIR --out latents.array_record

Every valid record of the configured image source is decoded, resized and turned into its latent
(`data.latents`) once, and written with its caption(s) to an ArrayRecord file. Training then uses
`data.source=cached` with `data.path` naming that file. A record is an `np.savez` archive (no
pickle): `latent` float16 [h, w, c] and `texts`.
"""

import io
import logging
import sys

import numpy as np
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource
from ml_collections import config_flags

from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.images import to_latent

log = logging.getLogger(__name__)


def encode_record(latent: np.ndarray, texts) -> bytes:
    texts = [texts] if isinstance(texts, str) else list(texts)
    buffer = io.BytesIO()
    np.savez(buffer, latent=latent.astype(np.float16), texts=np.array(texts, dtype=np.str_))
    return buffer.getvalue()


def decode_record(data: bytes) -> tuple[np.ndarray, list[str]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["latent"].astype(np.float32), archive["texts"].tolist()


def write_cache(records, image_size: int, latents: str, path) -> tuple[int, int]:
    """Writes every decodable record; returns (written, skipped)."""
    writer = ArrayRecordWriter(str(path), "group_size:1")
    written = skipped = 0
    for i in range(len(records)):
        record = records[i]
        pixels = decode_image(record, image_size)
        if isinstance(pixels, Skipped):
            log.warning("%s", pixels)
            skipped += 1
            continue
        writer.write(encode_record(to_latent(pixels, latents), record["text"]))
        written += 1
    writer.close()
    return written, skipped


class CachedSource:
    """Records of a cache file, in the shape the document transform expects."""

    def __init__(self, path):
        self.source = ArrayRecordDataSource(str(path))
        self.skipped = 0
        if len(self.source) == 0:
            raise ValueError(f"config field data.path: the cache {path} holds no record")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        latent, texts = decode_record(self.source[index])
        return {"latent": latent, "text": texts, "origin": f"cache[{index}]"}


def main(argv):
    del argv
    from transfusion_jax.data.pipeline import open_source  # here: pipeline imports this module

    cfg, out = flags.FLAGS.config, flags.FLAGS.out
    records = open_source(cfg)
    written, skipped = write_cache(records, cfg.data.image_size, cfg.data.latents, out)
    print(f"wrote {written} records to {out}; skipped {skipped + records.skipped}")


if __name__ == "__main__":  # flags are defined only for the command, not on import
    config_flags.DEFINE_config_file("config", None, "Config whose data.* names the source.")
    flags.DEFINE_string("out", None, "The ArrayRecord file to write.")
    flags.mark_flags_as_required(["config", "out"])
    sys.exit(app.run(main))
