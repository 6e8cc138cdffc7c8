"""Cache a dataset's latents once, so training reads them instead of decoding images again.

  python -m transfusion_jax.data.cache --config configs/tiny.py \
      --config.data.source=imagefolder --config.data.path=DIR --out latents.array_record
  python -m transfusion_jax.data.cache --config ... --vae VAE_PATH --out latents.array_record

Every valid record of the configured image source's training split (`data.held_out_percent`
of the records are held out for evaluation) is decoded, resized and written with its
caption(s) to an ArrayRecord file: as pixels, or with `--vae` (a diffusers AutoencoderKL directory
or a train_vae workdir) as the VAE's posterior (mean and log-variance, unnormalised), encoded in
batches on the local devices. Training then uses `data.source=cached` with `data.path` naming the
file (and, for a VAE cache, `data.latents=vae` with the same `image.vae_path`: its normalisation
and the posterior sampling are applied as the data is read). A record is an `np.savez` archive
(no pickle).
"""

import json
import logging
import time

import numpy as np
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags
from tqdm import tqdm

from transfusion_jax import cli
from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.images import DEFAULT_MAX_PIXELS
from transfusion_jax.data.pipeline import training_split
from transfusion_jax.data.sources import encode_record, open_source, split_record_path
from transfusion_jax.paths import absolute, is_local

log = logging.getLogger(__name__)


def write_cache(
    records, image_size: int, path, max_pixels: int = DEFAULT_MAX_PIXELS, vae=None, batch=32
) -> tuple[int, int]:
    """Writes every decodable record (pixels, or `vae`'s posterior of it); returns (written,
    skipped)."""
    if not is_local(path):
        raise ValueError(
            f"--out {path}: ArrayRecord writes local files only; write the cache to a local disk "
            f"and copy it, or mount the bucket (gcsfuse)"
        )
    writer = ArrayRecordWriter(str(path), "group_size:1")
    written = skipped = 0
    pending = []  # (pixels, texts) waiting for a full encoder batch

    def flush():
        nonlocal written
        if not pending:
            return
        pixels = np.stack([p for p, _ in pending])
        if vae is None:
            outputs = [(p, None) for p in pixels]
        else:
            padded = np.concatenate([pixels, np.repeat(pixels[:1], batch - len(pixels), 0)])
            mean, logvar = (np.asarray(a)[: len(pixels)] for a in vae.encode(padded))
            outputs = list(zip(mean, logvar, strict=True))
        for (latent, logvar), (_, texts) in zip(outputs, pending, strict=True):
            writer.write(encode_record(latent, texts, logvar))
            written += 1
        pending.clear()

    for i in tqdm(range(len(records)), desc="cache", unit="image", mininterval=5):
        record = records[i]
        pixels = decode_image(record, image_size, max_pixels)
        if isinstance(pixels, Skipped):
            log.warning("%s", pixels)
            skipped += 1
            continue
        pending.append((pixels, record["text"]))
        if len(pending) == batch:
            flush()
    flush()
    writer.close()
    return written, skipped


def write_split_record(path, cfg) -> None:
    """PATH.split.json: the source and held-out share the cache left out, so evaluation of a run
    trained on it reads exactly the records it never saw."""
    data = cfg.data
    keys = ("source", "path", "tfds_name", "tfds_split", "tfds_data_dir", "tfds_image_key")
    record = {k: data[k] for k in keys} | {"tfds_caption_key": data.tfds_caption_key}
    record["held_out_percent"] = data.held_out_percent
    if record["path"]:
        record["path"] = str(absolute(record["path"]))
    split_record_path(path).write_text(json.dumps(record, indent=2) + "\n")


def main():
    f = flags.FLAGS
    cfg, out = f.config, f.out
    vae = None
    if f.vae:
        from transfusion_jax.vae import load_vae

        try:
            vae = load_vae(f.vae)
            vae.latent_shape(cfg.data.image_size)  # a clear error before any work
        except (OSError, ValueError) as e:
            raise ValueError(f"--vae {f.vae}: {e}") from e
    data = cfg.data
    # Held-out records stay out of the cache: a run trained on it never sees what evaluation
    # reads from the folder (data.held_out_percent, as training from the folder would).
    records = training_split(open_source(cfg), data.held_out_percent, "data.path")
    start = time.perf_counter()
    written, skipped = write_cache(
        records, data.image_size, out, data.max_image_pixels, vae, f.batch
    )
    write_split_record(out, cfg)
    rate = written / (time.perf_counter() - start)
    kind = f"VAE posteriors ({f.vae})" if vae else "pixels"
    skipped += records.skipped
    print(f"wrote {written} records ({kind}, {rate:.1f}/s) to {out}; skipped {skipped}")


if __name__ == "__main__":  # flags are defined only for the command, not on import
    config_flags.DEFINE_config_file("config", None, "Config whose data.* names the source.")
    flags.DEFINE_string("out", None, "The ArrayRecord file to write.")
    flags.DEFINE_string("vae", "", "Cache this VAE's latents (diffusers dir or train_vae workdir).")
    flags.DEFINE_integer("batch", 32, "Images encoded together (with --vae).")
    flags.mark_flags_as_required(["config", "out"])
    cli.run(main)
