"""Images for VAE training: a fixed held-out split, shuffled training batches, evaluation images.

The split is `data.split`'s, the one Transfusion runs hold out too: a fixed hash of the file
name, `data.held_out_percent` of the records.
"""

import grain
import numpy as np

from transfusion_jax.data.documents import Skipped, decode_image
from transfusion_jax.data.sources import open_source
from transfusion_jax.data.split import held_out


class DecodeImage:
    """A grain map: record -> float32 [size, size, 3] in [-1, 1], or Skipped."""

    def __init__(self, image_size: int, max_pixels: int):
        self.image_size, self.max_pixels = image_size, max_pixels

    def __call__(self, record: dict):
        return decode_image(record, self.image_size, self.max_pixels)


def _open_images(cfg):
    records = open_source(cfg)
    if len(records) == 0 or "image" not in records[0]:
        raise ValueError(f"config field data.source: {cfg.data.source!r} holds no images")
    return records


class ImageBatches:
    """This process's share of the training split as numpy batches [B, H, W, 3], forever, with
    `get_state()` / `set_state()` for an exact resume and `skipped_examples` (distinct records
    that could not be decoded, each warned about once by the caller's log)."""

    def __init__(self, cfg, batch_size: int, process_index: int = 0, process_count: int = 1):
        data = cfg.data
        records = _open_images(cfg)
        self.batch_size = batch_size
        self.initial_skipped = records.skipped
        percent = data.held_out_percent
        dataset = (
            grain.MapDataset.source(records)
            .filter(lambda r: not held_out(r["origin"], percent))
            .seed(cfg.train.seed)
            .shuffle()
            .repeat(None)
            .map(DecodeImage(data.image_size, data.max_image_pixels))[process_index::process_count]
        )
        options = grain.ReadOptions(
            num_threads=data.num_threads, prefetch_buffer_size=data.prefetch
        )
        self.images = iter(dataset.to_iter_dataset(options))
        self._skipped: set[str] = set()
        self.skipped_draws = 0

    @property
    def skipped_examples(self) -> int:
        return self.initial_skipped + len(self._skipped)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = []
        while len(batch) < self.batch_size:
            image = next(self.images)
            if isinstance(image, Skipped):
                self.skipped_draws += 1
                if image.origin not in self._skipped:
                    self._skipped.add(image.origin)
                    print(f"warning: {image}", flush=True)
                continue
            batch.append(image)
        return np.stack(batch)

    def get_state(self) -> dict:
        return {
            "images": self.images.get_state(),
            "skipped": sorted(self._skipped),
            "draws": self.skipped_draws,
        }

    def set_state(self, state: dict) -> None:
        self.images.set_state(state["images"])
        self._skipped, self.skipped_draws = set(state["skipped"]), state["draws"]


def first_images(cfg, count: int, held: bool) -> np.ndarray:
    """The first `count` distinct decodable images of the held-out (or the training) split, in
    record order: a fixed evaluation set. Fewer when the split is smaller; [0, H, W, 3] if empty."""
    records = _open_images(cfg)
    data = cfg.data
    seen, images = set(), []
    for i in range(len(records)):
        if len(images) == count:
            break
        record = records[i]
        if held_out(record["origin"], data.held_out_percent) != held or record["origin"] in seen:
            continue
        seen.add(record["origin"])
        image = decode_image(record, data.image_size, data.max_image_pixels)
        if not isinstance(image, Skipped):
            images.append(image)
    if not images:
        return np.zeros((0, data.image_size, data.image_size, 3), np.float32)
    return np.stack(images)
