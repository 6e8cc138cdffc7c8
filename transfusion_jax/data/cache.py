"""Cache a dataset's latents once, so training reads them instead of decoding images again.

  python -m transfusion_jax.data.cache --config configs/tiny.py \
      --config.data.source=imagefolder --config.data.path=DIR --out latents.array_record

Every valid record of the configured image source is decoded, resized and turned into its latent
(`data.latents`) once, and written with its caption(s) to an ArrayRecord file. Training then uses
`data.source=cached` with `data.path` naming that file. A record is an `np.savez` archive (no
pickle): `latent` float16 [h, w, c] and `texts`.
"""

import logging

from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags

from transfusion_jax import cli
from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.images import DEFAULT_MAX_PIXELS, to_latent
from transfusion_jax.data.sources import encode_record, open_source

log = logging.getLogger(__name__)


def write_cache(
    records, image_size: int, latents: str, path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """Writes every decodable record; returns (written, skipped)."""
    writer = ArrayRecordWriter(str(path), "group_size:1")
    written = skipped = 0
    for i in range(len(records)):
        record = records[i]
        pixels = decode_image(record, image_size, max_pixels)
        if isinstance(pixels, Skipped):
            log.warning("%s", pixels)
            skipped += 1
            continue
        writer.write(encode_record(to_latent(pixels, latents), record["text"]))
        written += 1
    writer.close()
    return written, skipped


def main():
    cfg, out = flags.FLAGS.config, flags.FLAGS.out
    records = open_source(cfg)
    d = cfg.data
    written, skipped = write_cache(records, d.image_size, d.latents, out, d.max_image_pixels)
    print(f"wrote {written} records to {out}; skipped {skipped + records.skipped}")


if __name__ == "__main__":  # flags are defined only for the command, not on import
    config_flags.DEFINE_config_file("config", None, "Config whose data.* names the source.")
    flags.DEFINE_string("out", None, "The ArrayRecord file to write.")
    flags.mark_flags_as_required(["config", "out"])
    cli.run(main)
