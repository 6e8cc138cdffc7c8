"""A synthetic but learnable mixed-modal source, for benchmarks and tests without a dataset.

Every document belongs to one of `NUM_CLASSES` classes: its caption is the class's fixed token
sequence and its image the class's fixed latent pattern plus a little noise, so a model can learn
caption -> image and image -> caption. 80% of documents are caption-first (the caption dropped at
`diffusion.cond_drop_rate`), 20% image-first. Row r of the stream is a pure function of
(seed, r), so any process can make its own rows and the state is a single counter.
"""

import numpy as np

from transfusion_jax.batch import (
    SpecialTokens,
    build_batch,
    caption_first_document,
    document_length,
    image_first_document,
)
from transfusion_jax.config import carried_image_shape

NUM_CLASSES = 10
FIRST_TEXT_ID = 5  # after the special tokens PAD BOS EOS BOI EOI


class SyntheticSource:
    def __init__(self, cfg, local_batch_size: int, process_index: int = 0, process_count: int = 1):
        im, vocab = cfg.image, cfg.model.vocab_size
        self.cfg, self.local_batch_size = cfg, local_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.shape = carried_image_shape(cfg)  # pixels when the train step encodes them
        self.num_patches = (im.latent_size // im.patch_size) ** 2
        self.special = SpecialTokens()
        classes = np.random.default_rng(12345)
        self.captions = classes.integers(FIRST_TEXT_ID, vocab, (NUM_CLASSES, cfg.data.caption_len))
        self.patterns = classes.normal(size=(NUM_CLASSES, *self.shape)).astype(np.float32)
        self.batches_done = 0
        self.skipped_examples = 0

    def _row(self, index: int) -> list:
        rng = np.random.default_rng((self.cfg.train.seed, index))
        row, used = [], 0
        while len(row) < self.cfg.image.max_images:
            c = int(rng.integers(NUM_CLASSES))
            latent = self.patterns[c] + 0.1 * rng.normal(size=self.shape).astype(np.float32)
            if rng.random() < 0.2:
                doc = image_first_document(latent, self.captions[c], self.special)
            else:
                drop = bool(rng.random() < self.cfg.diffusion.cond_drop_rate)
                doc = caption_first_document(self.captions[c], latent, self.special, drop)
            length = document_length(doc, self.num_patches)
            if used + length > self.cfg.data.seq_len:
                break
            row.append(doc)
            used += length
        if not row:
            raise ValueError(
                f"config field data.seq_len: {self.cfg.data.seq_len} cannot hold one document "
                f"of {document_length(doc, self.num_patches)} positions"
            )
        return row

    def __iter__(self):
        return self

    def __next__(self):
        global_batch = self.local_batch_size * self.process_count
        first = self.batches_done * global_batch + self.process_index * self.local_batch_size
        rows = [self._row(first + i) for i in range(self.local_batch_size)]
        self.batches_done += 1
        image = self.cfg.image
        return build_batch(
            rows,
            self.cfg.data.seq_len,
            image.max_images,
            self.shape,
            image.patch_size,
            self.special,
            self.num_patches,
        )

    def get_state(self) -> dict:
        return {"batches_done": self.batches_done}

    def set_state(self, state: dict) -> None:
        self.batches_done = int(state["batches_done"])
