"""Paths of run directories and data: a local path or an object store's URL (gs://, s3://),
both as `etils.epath.Path`, so every file a run writes or reads goes through one abstraction.

`pathlib.Path("gs://bucket/run")` is the local relative path "gs:/bucket/run" (a run would
write ./gs:/bucket/run), and so is epath's `.absolute()` of a URL: paths go through `as_path` and
`absolute` here instead. epath reads and writes gs:// with TensorFlow's gfile when TensorFlow is
installed, else with fsspec, which needs `gcsfs` (`s3fs` for s3://).

What an object store lacks, the callers handle: no file locks (`workdir.WorkdirLock` warns), no
appends (`train.MetricsWriter` rewrites metrics.jsonl), no atomic rename (`write_atomically`
writes the object itself, which an object store makes visible only once complete), and readers
that take a local file name only: safetensors reads a `local_copy`, and ArrayRecord (the latent
cache) refuses a URL with a message.
"""

import contextlib
import io
import os
import pathlib
import tempfile

from etils import epath


def as_path(path) -> epath.Path:
    """`path` (a str, pathlib or epath path, or a URL) as an epath.Path; a URL keeps its
    `scheme://`, a local path stays as given (relative or not)."""
    return epath.Path(path)


def is_local(path) -> bool:
    """False for an object store's URL (gs://, s3://, ...)."""
    return "://" not in os.fspath(path)


def absolute(path) -> epath.Path:
    """A local path made absolute (Orbax refuses relative ones) as pathlib does it (epath's
    would also fold "a/.." away); a URL as it is."""
    return as_path(pathlib.Path(path).absolute()) if is_local(path) else as_path(path)


def write_atomically(path, content: str | bytes) -> None:
    """Writes `content` so a crash leaves the old file or the new one, never half of one. A
    local file is written beside `path` and renamed over it; an object (gs://) is written
    directly: a store makes an upload visible only once it completes, while its "rename" is a
    copy then a delete, which is not atomic."""
    path = as_path(path)
    data = content.encode() if isinstance(content, str) else content
    if not is_local(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_image(image, path) -> None:
    """A PIL image written to `path` (local or a URL; PIL given a URL would write a local file
    named after it), in the format its suffix names."""
    from PIL import Image

    path = as_path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:  # checked before the file is created, as PIL does
        raise ValueError(f"{path}: unknown image file extension {path.suffix!r}")
    with path.open("wb") as f:
        image.save(f, format=image_format)


def save_figure(figure, path, dpi: int = 100) -> None:
    """A matplotlib figure written to `path` (local or a URL: matplotlib given a URL would write a
    local file named after it), drawn to memory in the format its suffix names."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix[1:].lower() or None, dpi=dpi)
    path.write_bytes(buffer.getvalue())


@contextlib.contextmanager
def local_copy(path):
    """A local file name holding `path`'s content, for readers that take only a file name
    (safetensors): `path` itself when local, else a temporary copy, deleted after."""
    path = as_path(path)
    if is_local(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as folder:
        copy = epath.Path(folder) / path.name
        with path.open("rb") as src, copy.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        yield copy
