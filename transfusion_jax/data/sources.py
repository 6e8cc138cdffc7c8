"""Random-access record sources (`len` and `[i]`), one per `data.source`, for grain to shuffle.

A record is a dict: `{"image": path | bytes | uint8 array, "text": str | list[str], "origin": str}`
for image-caption data (several captions: one is drawn per use), or `{"text": str, "origin": str}`
for text. `origin` names where the record came from, for warnings. Records are cheap: images are
decoded later, in the document transform, so a bad image costs a skip, not a crash.
"""

import json
import logging
import pathlib

from transfusion_jax.data.shapes import ShapesDataset

log = logging.getLogger(__name__)


class ImageFolderSource:
    """A Hugging Face ImageFolder directory: `metadata.jsonl` rows `{"file_name", "text"}`.

    Bad rows (invalid JSON, missing fields, an empty caption, a file that does not exist) are
    skipped with a warning naming the line, and counted in `skipped`.
    """

    def __init__(self, path):
        self.root = pathlib.Path(path)
        metadata = self.root / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"config field data.path: {metadata} does not exist (an ImageFolder directory "
                f'needs metadata.jsonl with rows {{"file_name": ..., "text": ...}})'
            )
        self.records, self.skipped = [], 0
        with metadata.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self._add(line, f"{metadata}:{line_number}")
        if not self.records:
            raise ValueError(
                f"config field data.path: {self.root} has no valid example "
                f"({self.skipped} rows of metadata.jsonl skipped, see the warnings)"
            )

    def _add(self, line: str, where: str) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return self._skip(f"{where}: not valid JSON ({e.msg}), skipped")
        if not isinstance(row, dict):
            return self._skip(f"{where}: not a JSON object, skipped")
        file_name, text = row.get("file_name"), row.get("text")
        if not isinstance(file_name, str) or not file_name:
            return self._skip(f'{where}: no "file_name", skipped')
        if not isinstance(text, str) or not text.strip():
            return self._skip(f'{where}: empty or missing "text" caption, skipped')
        image = self.root / file_name
        if not image.is_file():
            return self._skip(f"{where}: image {image} does not exist, skipped")
        self.records.append((str(image), text.strip()))

    def _skip(self, message: str) -> None:
        log.warning(message)
        self.skipped += 1

    @property
    def num_images(self) -> int:
        return len({image for image, _ in self.records})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image, text = self.records[index]
        return {"image": image, "text": text, "origin": image}


class TfdsSource:
    """A prepared TFDS dataset read with `tfds.data_source` (ArrayRecord; no TensorFlow needed).

    `data.tfds_image_key` and `data.tfds_caption_key` name the fields; a nested field is written
    with "/", e.g. "captions/text" for coco_captions (a list of captions per image).
    """

    def __init__(self, name, split, data_dir, image_key, caption_key, data_source=None):
        if data_source is None:
            import tensorflow_datasets as tfds

            data_source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        self.name, self.source = name, data_source
        self.image_key, self.caption_key = image_key, caption_key
        self.skipped = 0
        if len(self.source) == 0:
            raise ValueError(f"config field data.tfds_name: {name}[{split}] has no example")
        self[0]  # a wrong field name fails here, at start, not in a worker mid-run

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        return {
            "image": _field(example, self.image_key, self.name),
            "text": _field(example, self.caption_key, self.name),
            "origin": f"{self.name}[{index}]",
        }


def _field(example, key: str, name: str):
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{name}: no field {key!r} (set data.tfds_image_key/caption_key)")
        value = value[part]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value  # encoded image bytes
    if hasattr(value, "dtype") and value.dtype.kind in "SO":  # arrays of byte strings
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.tolist()]
    return value


class TextSource:
    """Text corpora: `.txt` files (one document per blank-line-separated paragraph) or `.jsonl`
    files (one document per line, in its "text" field); a directory reads all of them."""

    def __init__(self, path):
        root = pathlib.Path(path)
        if not root.exists():
            raise FileNotFoundError(f"config field data.text_path: {root} does not exist")
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        self.documents, self.skipped = [], 0
        for file in files:
            if file.suffix == ".txt":
                text = file.read_text(encoding="utf-8", errors="replace")
                for i, paragraph in enumerate(text.split("\n\n")):
                    if paragraph.strip():
                        self.documents.append((paragraph.strip(), f"{file} paragraph {i}"))
            elif file.suffix == ".jsonl":
                self._read_jsonl(file)
        if not self.documents:
            raise ValueError(f"config field data.text_path: no text document in {root}")

    def _read_jsonl(self, file: pathlib.Path) -> None:
        with file.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                try:
                    text = json.loads(line).get("text") if line.strip() else None
                except (json.JSONDecodeError, AttributeError):
                    text = None
                if isinstance(text, str) and text.strip():
                    self.documents.append((text.strip(), f"{file}:{line_number}"))
                elif line.strip():
                    log.warning('%s:%d: no "text" field, skipped', file, line_number)
                    self.skipped += 1

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        text, origin = self.documents[index]
        return {"text": text, "origin": origin}


class ShapesSource:
    """The built-in procedurally generated shapes dataset (data/shapes.py): infinite."""

    def __init__(self, image_size: int, seed: int):
        self.dataset = ShapesDataset(image_size=image_size, seed=seed)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {"image": item["image"], "text": item["text"], "origin": f"shapes[{index}]"}
