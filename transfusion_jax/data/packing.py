"""First-fit packing of documents into rows of `seq_len` positions with at most `max_images`
images each, and the iterator that turns a document stream into packed numpy batches.

A document is never split across rows, except a text-only document longer than a row, which is
cut into row-sized chunks (each its own document). Packing works on windows of
`data.pack_window` documents: the window is first-fit packed and its rows are emitted in order.
So the iterator's whole state is the document stream's state at the window start plus the number
of rows already emitted: a restore re-reads and re-packs that window and skips those rows, which
makes resumption exact without storing any buffered document.
"""

import dataclasses
import logging

from transfusion_jax.batch import Image, build_batch, document_length
from transfusion_jax.data.documents import Skipped
from transfusion_jax.workdir import RunError

log = logging.getLogger(__name__)


def num_images(document) -> int:
    return sum(isinstance(part, Image) for part in document)


def chunk_text(document, seq_len: int) -> list:
    """A text-only document as pieces of at most seq_len tokens (itself when it fits)."""
    tokens = [t for part in document for t in part]
    return [[tokens[i : i + seq_len]] for i in range(0, len(tokens), seq_len)]


@dataclasses.dataclass
class _Row:
    documents: list
    length: int = 0
    images: int = 0


def first_fit(documents, seq_len: int, max_images: int, num_patches: int) -> list[list]:
    """Rows (lists of documents) in order of opening; each document goes to the first row with
    room for its positions and images."""
    rows: list[_Row] = []
    for document in documents:
        pieces = [document]
        if num_images(document) == 0 and document_length(document, num_patches) > seq_len:
            pieces = chunk_text(document, seq_len)
        for piece in pieces:
            length, images = document_length(piece, num_patches), num_images(piece)
            if length > seq_len or images > max_images:
                raise ValueError(
                    f"config field data.seq_len: a document of {length} positions and {images} "
                    f"images cannot fit a row of {seq_len} positions and image.max_images="
                    f"{max_images}; raise data.seq_len or lower data.max_caption_tokens"
                )
            for row in rows:
                if row.length + length <= seq_len and row.images + images <= max_images:
                    break
            else:
                row = _Row([])
                rows.append(row)
            row.documents.append(piece)
            row.length += length
            row.images += images
    return [row.documents for row in rows]


class NoUsableRecordError(RunError):
    """The data stream holds no record that makes a document: every one is `Skipped`."""


class PackedBatches:
    """Numpy `Batch`es of `batch_size` rows from a stream of documents (or `Skipped` markers).

    `documents` is an iterator with `get_state()` / `set_state()` (a grain dataset iterator).
    `skipped_examples` counts the distinct records skipped so far (including `initial_skipped`,
    e.g. bad metadata rows found when the source was opened), each warned about once;
    `skipped_draws` counts every time one was drawn (a bad record comes back every epoch).
    """

    def __init__(
        self,
        documents,
        batch_size: int,
        seq_len: int,
        max_images: int,
        latent_shape: tuple,
        patch_size: int,
        special,
        window: int,
        initial_skipped: int = 0,
        num_patches: int | None = None,
    ):
        self.documents, self.batch_size, self.seq_len = documents, batch_size, seq_len
        self.max_images, self.latent_shape, self.patch_size = max_images, latent_shape, patch_size
        self.special, self.window = special, window
        h, w, _ = latent_shape
        self.num_patches = num_patches or (h // patch_size) * (w // patch_size)
        self.initial_skipped = initial_skipped
        self._skipped, self.skipped_draws = set(), 0  # origins of skipped records; draws
        self._rows, self._emitted = [], 0
        self._window_state = documents.get_state()
        self._skipped_before_window = self._skipped_state()

    @property
    def skipped_examples(self) -> int:
        return self.initial_skipped + len(self._skipped)

    def _skipped_state(self) -> dict:
        return {"origins": sorted(self._skipped), "draws": self.skipped_draws}

    def _skip(self, skipped: Skipped) -> None:
        self.skipped_draws += 1
        if skipped.origin not in self._skipped:
            self._skipped.add(skipped.origin)
            log.warning("%s", skipped)

    def _next_window(self) -> None:
        self._window_state = self.documents.get_state()
        self._skipped_before_window = self._skipped_state()
        window = []
        # Skipped draws since the last document, and their records. Each record comes once an
        # epoch, so a run of skips that draws some record a third time spans a whole epoch: then
        # no record is usable, and drawing on would spin forever.
        run_draws, run_origins = 0, set()
        while len(window) < self.window:
            document = next(self.documents)
            if not isinstance(document, Skipped):
                window.append(document)
                run_draws, run_origins = 0, set()
                continue
            self._skip(document)
            run_draws += 1
            run_origins.add(document.origin)
            if run_draws > 2 * len(run_origins):
                raise NoUsableRecordError(
                    f"every record of the data was skipped ({len(run_origins)} records, each "
                    f"drawn at least twice with no usable one between), e.g. {document}; the "
                    "warnings above give each record's reason: fix the data, or the data.* "
                    "setting that rejects it"
                )
        self._rows = first_fit(window, self.seq_len, self.max_images, self.num_patches)
        self._emitted = 0

    def _next_row(self) -> list:
        if self._emitted == len(self._rows):
            self._next_window()
        self._emitted += 1
        return self._rows[self._emitted - 1]

    def __iter__(self):
        return self

    def __next__(self):
        rows = [self._next_row() for _ in range(self.batch_size)]
        return build_batch(
            rows,
            self.seq_len,
            self.max_images,
            self.latent_shape,
            self.patch_size,
            self.special,
            self.num_patches,
        )

    def get_state(self) -> dict:
        return {
            "documents": self._window_state,
            "rows_emitted": self._emitted,
            "skipped_before_window": self._skipped_before_window,
        }

    def set_state(self, state: dict) -> None:
        self.documents.set_state(state["documents"])
        skipped = state["skipped_before_window"]
        if isinstance(skipped, int):  # saved before bad records were told apart: a count only
            skipped = {
                "origins": [f"(record {i} before resume)" for i in range(skipped)],
                "draws": skipped,
            }
        self._skipped, self.skipped_draws = set(skipped["origins"]), skipped["draws"]
        self._rows, self._emitted = [], 0
        if state["rows_emitted"]:
            self._next_window()
            self._emitted = state["rows_emitted"]
        else:
            self._window_state = state["documents"]
            self._skipped_before_window = skipped
