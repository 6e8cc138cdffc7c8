"""The grain input pipeline: source -> seeded shuffle -> repeat -> per-process shard -> document
transform (threads, optionally worker processes) -> text mixing -> first-fit packing -> batches.

The same seed gives the same batches, and the returned iterator's `get_state()` (JSON) restores
the stream exactly, so a resumed run sees the batches an uninterrupted one would have.
"""

import logging
import signal

import grain
from absl import flags

from transfusion_jax.batch import document_length
from transfusion_jax.config import carried_image_shape
from transfusion_jax.data.documents import Skipped, ToDocument
from transfusion_jax.data.packing import PackedBatches
from transfusion_jax.data.sources import (
    TextSource,
    open_source,
    read_split_record,
    split_record_path,
)
from transfusion_jax.data.split import split
from transfusion_jax.data.tokenizer import make_tokenizer

log = logging.getLogger(__name__)


def document_stream(
    records, cfg, tokenizer, seed: int, process_index: int, process_count: int, space=None
):
    """A grain IterDataset of documents (or Skipped markers) for this process."""
    data = cfg.data
    dataset = grain.MapDataset.source(records).seed(seed).shuffle().repeat(None)
    # random_map before the shard: each document's draws are seeded by its global index, so the
    # processes' choices (direction, caption drop, which caption) are independent of each other.
    dataset = dataset.random_map(ToDocument(cfg, tokenizer, space))[process_index::process_count]
    stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    )
    if data.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside app.run
            flags.FLAGS.mark_as_parsed()  # (a library call, a test) use their defaults
        stream = stream.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data.num_workers),
            worker_init_fn=ignore_stop_signals,
        )
    return stream


def ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """Keeps a decoding worker alive through Ctrl-C or a SIGTERM sent to the whole process
    group: the training process then checkpoints, which needs the next batch and the stream's
    state, and grain stops its workers as it closes (an event, then SIGKILL after a timeout)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class MixedDocuments:
    """Interleaves image-caption and text documents so that text positions / image-caption
    positions stays at `text_ratio` (the paper: 1.0). Deterministic; state = both streams' states
    and the two position counters."""

    def __init__(self, image_docs, text_docs, text_ratio: float, num_patches: int):
        self.image_docs, self.text_docs = image_docs, text_docs
        self.ratio, self.num_patches = text_ratio, num_patches
        self.image_positions = self.text_positions = 0

    def __iter__(self):
        return self

    def __next__(self):
        use_text = self.text_positions < self.ratio * self.image_positions
        document = next(self.text_docs if use_text else self.image_docs)
        if not isinstance(document, Skipped):
            length = document_length(document, self.num_patches)
            if use_text:
                self.text_positions += length
            else:
                self.image_positions += length
        return document

    def get_state(self) -> dict:
        return {
            "image": self.image_docs.get_state(),
            "text": self.text_docs.get_state(),
            "positions": [self.image_positions, self.text_positions],
        }

    def set_state(self, state: dict) -> None:
        self.image_docs.set_state(state["image"])
        self.text_docs.set_state(state["text"])
        self.image_positions, self.text_positions = state["positions"]


def make_pipeline(cfg, local_batch_size: int, process_index: int = 0, process_count: int = 1):
    """This process's batch iterator for `cfg.data`, with get_state/set_state and
    `skipped_examples`."""
    data, image = cfg.data, cfg.image
    tokenizer = make_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"config field model.vocab_size: {cfg.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} ({data.tokenizer})"
        )
    if data.latents == "pixels" and (image.latent_size, image.latent_channels) != (
        data.image_size,
        3,
    ):
        raise ValueError(
            f"config fields image.latent_size/latent_channels: pixel-space images need "
            f"{data.image_size} and 3 (data.image_size, RGB), got {image.latent_size} and "
            f"{image.latent_channels}"
        )
    latent_shape = (image.latent_size, image.latent_size, image.latent_channels)
    num_patches = (image.latent_size // image.patch_size) ** 2
    seed = cfg.train.seed
    records = training_split(open_source(cfg), data.held_out_percent, source_field(data))
    skipped = records.skipped
    space = None
    if data.latents == "vae":
        from transfusion_jax.vae.latent_space import latent_space

        space = latent_space(image.vae_path)
    if data.source == "cached":
        _check_cache(records[0], data, latent_shape)
        if read_split_record(data.path) is None and process_index == 0:
            log.warning(
                "%s was written before held-out splits (no %s): it may hold the records "
                "evaluation reads; write it again with python -m transfusion_jax.data.cache",
                data.path,
                split_record_path(data.path).name,
            )
    documents = iter(
        document_stream(records, cfg, tokenizer, seed, process_index, process_count, space)
    )
    if data.source != "text" and data.text_path and data.text_ratio > 0:
        text = training_split(TextSource(data.text_path), data.held_out_percent, "data.text_path")
        skipped += text.skipped
        text_docs = iter(
            document_stream(text, cfg, tokenizer, seed + 1, process_index, process_count)
        )
        documents = MixedDocuments(documents, text_docs, data.text_ratio, num_patches)
    return PackedBatches(
        documents,
        local_batch_size,
        data.seq_len,
        image.max_images,
        carried_image_shape(cfg),
        image.patch_size,
        tokenizer.special,
        data.pack_window,
        skipped,
        num_patches,
    )


def source_field(d) -> str:
    """The config field that names where the records come from, for messages."""
    return {"text": "data.text_path", "tfds": "data.tfds_name"}.get(d.source, "data.path")


def training_split(records, percent: float, field: str):
    """The records training may see: all but the held-out split (sources that name their
    records: image folders, TFDS, text; the shapes data holds out scenes of another seed, and a
    latent cache holds the training split only)."""
    if percent <= 0 or not hasattr(records, "record_name"):
        return records
    kept = split(records, percent, held=False)
    if len(kept) == 0:
        raise ValueError(
            f"config field data.held_out_percent: all {len(records)} records of {field} fall in "
            f"the held-out {percent}%; lower it (0 trains on everything)"
        )
    return kept


def _check_cache(first: dict, d, latent_shape: tuple) -> None:
    """A latent cache must hold what the config trains on: pixels of the image size, or the
    posteriors of this VAE at this size."""
    holds_vae = "logvar" in first
    wants_vae = d.latents == "vae"
    if holds_vae != wants_vae:
        held = "VAE latents" if holds_vae else "pixels"
        raise ValueError(
            f"config field data.latents: {d.latents!r}, but the cache {d.path} holds {held}; "
            f"write it again with python -m transfusion_jax.data.cache"
            + ("" if holds_vae else " --vae PATH")
        )
    shape = tuple(first["latent"].shape)
    if shape != tuple(latent_shape):
        raise ValueError(
            f"config field data.path: the cache {d.path} holds latents of shape {shape}, the "
            f"config expects {tuple(latent_shape)} (written with another VAE or image size?)"
        )
