"""Random-access record sources (`len` and `[i]`), one per `data.source`, for grain to shuffle;
`open_source(cfg)` picks the configured one. `CachedSource` reads the latent cache that
`data/cache.py` writes (the record format is defined here, beside its reader).

A record is a dict: `{"image": path | bytes | uint8 array, "text": str | list[str], "origin": str}`
for image-caption data (several captions: one is drawn per use), or `{"text": str, "origin": str}`
for text. `origin` names where the record came from, for warnings. Records are cheap: images are
decoded later, in the document transform, so a bad image costs a skip, not a crash.
"""

import io
import json
import logging
import pathlib
import posixpath
import stat

import numpy as np
from grain.sources import ArrayRecordDataSource

from transfusion_jax.data.shapes import ShapesDataset
from transfusion_jax.paths import as_path, is_local

log = logging.getLogger(__name__)


class ImageFolderSource:
    """A Hugging Face ImageFolder directory: `metadata.jsonl` rows `{"file_name", "text"}`.

    Bad rows (invalid UTF-8 or JSON, missing fields, an empty caption, a file that does not exist
    or is not a regular file, a `file_name` that leaves the directory: absolute, through "..", or
    through a symlink pointing outside)
    are skipped with a warning naming the line, and counted in `skipped`.
    """

    def __init__(self, path, field: str = "data.path"):
        if not str(path):  # as_path("") is the current directory: say what is missing instead
            raise FileNotFoundError(
                f"config field {field}: not set; give --config.{field}=FOLDER, an ImageFolder "
                f'directory with metadata.jsonl rows {{"file_name": ..., "text": ...}}'
            )
        self.root = as_path(path)  # a local path or a URL (gs://)
        metadata = self.root / "metadata.jsonl"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"config field {field}: {metadata} does not exist (an ImageFolder directory "
                f'needs metadata.jsonl with rows {{"file_name": ..., "text": ...}})'
            )
        self.records, self.skipped = [], 0
        self._resolved_root = pathlib.Path(self.root).resolve() if is_local(self.root) else None
        for line, where in _utf8_lines(metadata, self._skip):
            self._add(line, where)
        if not self.records:
            raise ValueError(
                f"config field {field}: {self.root} has no valid example "
                f"({self.skipped} rows of metadata.jsonl skipped, see the warnings)"
            )

    def _add(self, line: str, where: str) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return self._skip(f"{where}: not valid JSON ({e.msg}), skipped")
        except RecursionError:
            return self._skip(f"{where}: JSON nested too deeply, skipped")
        if not isinstance(row, dict):
            return self._skip(f"{where}: not a JSON object, skipped")
        file_name, text = row.get("file_name"), row.get("text")
        if not isinstance(file_name, str) or not file_name:
            return self._skip(f'{where}: no "file_name", skipped')
        if not isinstance(text, str) or not text.strip():
            return self._skip(f'{where}: empty or missing "text" caption, skipped')
        if "\0" in file_name:
            return self._skip(f"{where}: file_name holds a NUL character, skipped")
        outside = f"{where}: file_name {file_name!r} is outside {self.root}, skipped"
        if self._resolved_root is None:
            # An object store: no symlinks, devices or pipes, and one request per image would
            # be slow; only the name is checked, a missing image is skipped when decoded.
            name = posixpath.normpath(file_name)
            if name.startswith(("/", "../")) or name == ".." or "://" in file_name:
                return self._skip(outside)
            return self.records.append((str(self.root / name), text.strip()))
        image = self.root / file_name
        problem = _not_a_regular_file(image)
        if problem:
            return self._skip(f"{where}: image {image} {problem}, skipped")
        if not pathlib.Path(image).resolve().is_relative_to(self._resolved_root):  # "..", symlinks
            return self._skip(outside)
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

    def record_name(self, index: int) -> str:
        return pathlib.PurePath(self.records[index][0]).name


class TfdsSource:
    """A prepared TFDS dataset read as a random-access data source (ArrayRecord; no TensorFlow
    needed), see `open_tfds`.

    `data.tfds_image_key` and `data.tfds_caption_key` name the fields; a nested field is written
    with "/", e.g. "captions/text" for coco_captions (a list of captions per image). A key that
    holds "/" itself, as coco_captions' "image/id" does, is found as it is first.
    """

    def __init__(self, name, split, data_dir, image_key, caption_key, data_source=None):
        if data_source is None:
            data_source = open_tfds(name, split, data_dir or None)
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
            "image": _field(example, self.image_key, self.name, "data.tfds_image_key"),
            "text": as_text(_field(example, self.caption_key, self.name, "data.tfds_caption_key")),
            "origin": self.record_name(index),
        }

    def record_name(self, index: int) -> str:
        return f"{self.name}[{index}]"


def open_tfds(name: str, split: str, data_dir: str | None):
    """`tfds.data_source(name, split=split, data_dir=data_dir)` for a dataset already prepared
    in ArrayRecord, read from the metadata beside its files (dataset_info.json, features.json)
    rather than from its builder's code: TFDS's own builders (coco_captions) import TensorFlow,
    and `tfds.data_source` would download and prepare a missing dataset, in the training run.
    An unprepared dataset, another file format or an unknown split is a `config field` error
    that says how to prepare it."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import read_only_builder
    from tensorflow_datasets.core.utils import file_utils

    dirs = [str(d) for d in file_utils.list_data_dirs(given_data_dir=data_dir)]
    where = (
        f"data.tfds_data_dir={data_dir}" if data_dir else f"TFDS's data dirs ({', '.join(dirs)})"
    )
    build = f"tfds build {name} --data_dir {data_dir or dirs[0]} --file_format=array_record"
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise FileNotFoundError(
            f"config field data.tfds_name: no prepared TFDS dataset {name!r} in {where}: set "
            f"data.tfds_data_dir to the directory it was prepared in, or prepare it with "
            f"`{build}` (that needs TensorFlow, reading it does not)"
        ) from None
    info = builder.info
    if info.file_format is not tfds.core.FileFormat.ARRAY_RECORD:
        formats = [f.value for f in [info.file_format, *info.alternative_file_formats] if f]
        if tfds.core.FileFormat.ARRAY_RECORD.value not in formats:
            raise ValueError(
                f"config field data.tfds_name: {name} in {builder.data_dir} is prepared as "
                f"{' and '.join(formats) or 'an unknown format'}, and random access needs "
                f"ArrayRecord: prepare it again with `{build} --overwrite`"
            )
        builder = tfds.builder_from_directory(builder.data_dir, file_format="array_record")
    try:
        return builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"config field data.tfds_split: {split!r} does not name a split of {name}, which has "
            f"{', '.join(info.splits)} ({str(e).splitlines()[0]})"
        ) from None


class MissingFieldError(KeyError):
    """A field name the dataset does not have; its message reads as written (a KeyError's
    would be quoted), so the command line shows it as one `error:` line."""

    def __str__(self) -> str:
        return str(self.args[0])


def _field(example, key: str, name: str, config_field: str):
    if isinstance(example, dict) and key in example:
        return example[key]
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise MissingFieldError(
                f"config field {config_field}: {name} has no field {key!r} "
                f"(its fields: {', '.join(_field_names(example))})"
            )
        value = value[part]
    return value


def _field_names(example, prefix: str = "") -> list[str]:
    """The names of an example's leaf fields, nested ones as "captions/text"."""
    names = []
    for key, value in example.items():
        if isinstance(value, dict):
            names += _field_names(value, f"{prefix}{key}/")
        else:
            names.append(f"{prefix}{key}")
    return names


def as_text(value):
    """A caption field as str, or a list of str for several captions. `tfds.data_source`
    returns text as bytes (numpy byte strings, object arrays of bytes for sequences); invalid
    UTF-8 becomes U+FFFD rather than failing the run."""
    if isinstance(value, bytes):  # also numpy.bytes_
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        value = value.tolist()  # a 0-d array gives its one element
        return as_text(value) if not isinstance(value, list) else [as_text(v) for v in value]
    if isinstance(value, list | tuple):
        return [as_text(v) for v in value]
    return str(value)


class TextSource:
    """Text corpora: `.txt` files (one document per blank-line-separated paragraph) or `.jsonl`
    files (one document per line, in its "text" field); a directory reads all of them.

    Text must be UTF-8: a paragraph or line that is not is skipped and counted in `skipped` (one
    warning per file), and a file holding NUL bytes is skipped whole as binary.
    """

    def __init__(self, path, field: str = "data.text_path"):
        if not str(path):
            raise FileNotFoundError(
                f"config field {field}: not set; give --config.{field}=PATH (a text file or "
                "a folder of them)"
            )
        root = as_path(path)  # a local path or a URL (gs://)
        if not root.exists():
            raise FileNotFoundError(f"config field {field}: {root} does not exist")
        files = sorted(_files_under(root)) if root.is_dir() else [root]
        self.documents, self.skipped = [], 0
        for file in files:
            if file.suffix not in (".txt", ".jsonl"):
                continue
            problem = _not_a_regular_file(file)
            if problem:  # a FIFO would hang the read, /dev/zero would fill the memory
                self._skip(f"{file} {problem}, skipped")
            elif file.suffix == ".txt":
                self._read_txt(file)
            else:
                self._read_jsonl(file)
        if not self.documents:
            raise ValueError(f"config field {field}: no text document in {root}")

    def _read_txt(self, file) -> None:
        data = file.read_bytes()
        if b"\0" in data:
            log.warning("%s: a binary file (it holds NUL bytes), skipped", file)
            self.skipped += 1
            return
        not_utf8 = 0
        for i, paragraph in enumerate(data.split(b"\n\n")):
            try:
                text = paragraph.decode("utf-8").strip()
            except UnicodeDecodeError:
                not_utf8 += 1
                continue
            if text:
                self.documents.append((text, f"{file} paragraph {i}"))
        if not_utf8:
            log.warning("%s: %d paragraphs are not valid UTF-8, skipped", file, not_utf8)
            self.skipped += not_utf8

    def _read_jsonl(self, file) -> None:
        for line, where in _utf8_lines(file, self._skip):
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError, RecursionError):
                text = None
            if isinstance(text, str) and text.strip():
                self.documents.append((text.strip(), where))
            else:
                self._skip(f'{where}: no "text" field, skipped')

    def _skip(self, message: str) -> None:
        log.warning(message)
        self.skipped += 1

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> dict:
        text, origin = self.documents[index]
        return {"text": text, "origin": origin}

    def record_name(self, index: int) -> str:
        return pathlib.PurePath(self.documents[index][1]).name  # "file.txt paragraph 3"


def _files_under(root) -> list:
    """Every file below a directory: a local one's as pathlib's rglob finds them, an object
    store's by listing each folder (epath's glob takes no "**" pattern)."""
    if is_local(root):
        return list(pathlib.Path(root).rglob("*"))
    files = []
    for child in root.iterdir():
        files += _files_under(child) if child.is_dir() else [child]
    return files


def _utf8_lines(path, skip):
    """(line, "path:N") for the non-blank lines of a file; a line that is not valid UTF-8 is
    passed to `skip` with its position instead of failing the whole file."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skip(f"{path}:{number}: not valid UTF-8 (byte {e.start + 1}), skipped")
                continue
            if line.strip():
                yield line, f"{path}:{number}"


def _not_a_regular_file(path) -> str | None:
    """Why `path` cannot be read as an image file, or None if it can (symlinks are followed)."""
    if not is_local(path):  # an object store holds regular files only (these were listed)
        return None
    path = pathlib.Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist" if not path.is_symlink() else "is a broken symlink"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "something else")
    return f"is {kind}, not a regular file"


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


# -- the latent cache (written by data/cache.py) -------------------------------------------------


def encode_record(latent: np.ndarray, texts, logvar: np.ndarray | None = None) -> bytes:
    """An `np.savez` archive: `latent` (pixels, or a VAE posterior's mean, unnormalised),
    `logvar` (the posterior's, VAE caches only) and `texts`."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    arrays = dict(latent=latent.astype(np.float16), texts=np.array(texts, dtype=np.str_))
    if logvar is not None:
        arrays["logvar"] = logvar.astype(np.float16)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_record(data: bytes) -> dict:
    """{"latent", "text"} (+ "logvar" for a VAE cache), float32 arrays."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        record = {"latent": archive["latent"].astype(np.float32), "text": archive["texts"].tolist()}
        if "logvar" in archive:
            record["logvar"] = archive["logvar"].astype(np.float32)
        return record


def split_record_path(cache):
    """Where data/cache.py records which source and held-out share a cache was written from."""
    return as_path(str(cache) + ".split.json")


def read_split_record(cache) -> dict | None:
    """The data config a cache was written from and its `held_out_percent` (None for a cache
    written before held-out splits existed: it may hold every record)."""
    path = split_record_path(cache)
    return json.loads(path.read_text()) if path.is_file() else None


class CachedSource:
    """Records of a cache file, in the shape the document transform expects."""

    def __init__(self, path):
        if not is_local(path):
            raise ValueError(
                f"config field data.path: the cache {path} is in an object store, and ArrayRecord "
                f"reads local files only: copy it to a local disk, or mount the bucket (gcsfuse)"
            )
        self.source = ArrayRecordDataSource(str(path))
        self.skipped = 0
        if len(self.source) == 0:
            raise ValueError(f"config field data.path: the cache {path} holds no record")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return dict(decode_record(self.source[index]), origin=f"cache[{index}]")


def open_source(cfg):
    data = cfg.data
    if data.source == "imagefolder":
        return ImageFolderSource(data.path)
    if data.source == "tfds":
        return TfdsSource(
            data.tfds_name,
            data.tfds_split,
            data.tfds_data_dir,
            data.tfds_image_key,
            data.tfds_caption_key,
        )
    if data.source == "shapes":
        return ShapesSource(data.image_size, cfg.train.seed)
    if data.source == "text":
        return TextSource(data.text_path)
    if data.source == "cached":
        return CachedSource(data.path)
    raise ValueError(f"config field data.source: {data.source!r} is not a grain source")
