"""Tensors of a PyTorch `torch.save` file as numpy arrays, without importing torch.

A `.pth` file is a pickle, and unpickling runs whatever the file names. Our unpickler resolves
only the handful of globals a saved state dict uses (torch's tensor/parameter rebuild functions,
its storage classes, OrderedDict) and refuses anything else, so a hostile file raises instead of
running code. Both of torch's formats are read:

- the zip format (torch >= 1.6): `<archive>/data.pkl` plus one `<archive>/data/<key>` record per
  storage;
- the older "legacy" stream (`_use_new_zipfile_serialization=False`, and everything saved before
  torch 1.6, such as pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`): magic number,
  protocol version and system-info pickles, the object pickle, the list of storage keys, then
  each storage as an int64 element count and its little-endian bytes.

torch < 0.4's tar archives are refused with a hint to re-save the file.
"""

import collections
import io
import pickle
import struct
import tarfile
import zipfile

import ml_dtypes
import numpy as np
from etils import epath

from transfusion_jax import paths

# torch's storage classes (as pickled by name) -> the numpy dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_RESAVE_HINT = (
    "re-save it with a current torch (torch.save(torch.load(path), path)) or convert it to "
    "safetensors (safetensors.torch.save_file(state_dict, path))"
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something other than tensors and the containers of a state dict."""


class _StorageType:
    """Stands in for a torch storage class (torch.FloatStorage...): only its dtype matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """A storage named by the pickle; `data` (a 1-D array) is filled in once its bytes are read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _Tensor:
    """A tensor named by the pickle, rebuilt into an array once its storage has been read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only _ALLOWED globals and storage classes; storages go to `storages` by key."""

    def __init__(self, file, source: str, storage_record):
        super().__init__(file, encoding="utf-8")
        self.source, self.storage_record = source, storage_record
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"{self.source}: the pickle names {module}.{name}, which is not part of a tensor "
            "state dict; refusing to load it (it could run arbitrary code)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r:.80}")
        storage_type, key, numel, view = self.storage_record(pid[1:])
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: storage of unknown type {storage_type!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if type(numel) is not int or numel < 0:
            raise ValueError(f"{self.source}: storage {key} has a bad size {numel!r:.40}")
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != storage_type.dtype:
            raise ValueError(f"{self.source}: storage {key} is read as two dtypes")
        if view is not None:  # torch < 1.0 storage views: (view key, offset, size) into the root
            _, offset, size = view
            return _View(storage, int(offset), int(size))
        return storage


class _View:
    """A slice of a storage (only written by torch < 1.0's legacy format)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, offset, size


def _zip_record(pid):
    storage_type, key, _location, numel = pid  # zip format: ('storage', type, key, loc, numel)
    return storage_type, key, numel, None


def _legacy_record(pid):
    storage_type, key, _location, numel, view = pid
    return storage_type, key, numel, view


def _storage_array(storage, source) -> np.ndarray:
    if isinstance(storage, _View):
        root = storage.root.data
        if storage.offset < 0 or storage.size < 0 or storage.offset + storage.size > root.size:
            raise ValueError(f"{source}: a storage view lies outside its storage")
        return root[storage.offset : storage.offset + storage.size]
    if not isinstance(storage, _Storage) or storage.data is None:
        raise ValueError(f"{source}: a tensor refers to a storage that was not saved")
    return storage.data


def _to_array(tensor: _Tensor, source: str) -> np.ndarray:
    """The tensor's elements, copied out of its storage; bounds are checked before as_strided."""
    data = _storage_array(tensor.storage, source)
    offset, size, stride = tensor.offset, tensor.size, tensor.stride
    ints = lambda xs: isinstance(xs, tuple | list) and all(type(v) is int for v in xs)
    if type(offset) is not int or not ints(size) or not ints(stride) or len(size) != len(stride):
        raise ValueError(f"{source}: malformed tensor record")
    if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise ValueError(f"{source}: negative tensor offset, size or stride")
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise ValueError(
            f"{source}: a tensor of size {tuple(size)} reaches element {last} of a storage of "
            f"{data.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        data[offset:],
        shape=tuple(size),
        strides=tuple(s * data.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _resolve(obj, source: str):
    """The unpickled object with every tensor record replaced by its numpy array."""
    if isinstance(obj, _Tensor):
        return _to_array(obj, source)
    if isinstance(obj, dict):
        return {k: _resolve(v, source) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, source) for v in obj)
    return obj


def _read_storage(raw: bytes, storage: _Storage, byteorder: str, source: str) -> np.ndarray:
    dtype = storage.dtype.newbyteorder(">") if byteorder == "big" else storage.dtype
    if len(raw) != storage.numel * dtype.itemsize:
        raise ValueError(
            f"{source}: storage {storage.key} has {len(raw)} bytes, expected "
            f"{storage.numel} x {dtype.itemsize} (truncated or corrupt file?)"
        )
    return np.frombuffer(raw, dtype).astype(storage.dtype, copy=byteorder == "big")


def _load_zip(path: epath.Path):
    with path.open("rb") as f, zipfile.ZipFile(f) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a zip file but not a torch.save archive (no */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byte order {byteorder!r:.20}")
        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), str(path), _zip_record)
        result = unpickler.load()
        for key, storage in unpickler.storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise ValueError(f"{path}: storage record {record} is missing")
            storage.data = _read_storage(archive.read(record), storage, byteorder, str(path))
    return _resolve(result, str(path))


def _load_legacy(path: epath.Path):
    source = str(path)
    with path.open("rb") as f:
        header = lambda: _Unpickler(f, source, _legacy_record).load()
        if header() != _LEGACY_MAGIC or header() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: not a torch.save file (bad magic number or protocol)")
        sys_info = header()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise ValueError(f"{path}: saved on a big-endian machine; {_RESAVE_HINT}")
        unpickler = _Unpickler(f, source, _legacy_record)
        result = unpickler.load()
        keys = header()
        if not isinstance(keys, list):
            raise ValueError(f"{path}: malformed storage key list")
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            storage = unpickler.storages.get(key)
            if storage is None:
                raise ValueError(f"{path}: storage {key} is not referenced by the pickle")
            count = f.read(8)
            if len(count) != 8:
                raise ValueError(f"{path}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", count)
            if numel != storage.numel:
                raise ValueError(
                    f"{path}: storage {key} has {numel} elements, expected {storage.numel}"
                )
            raw = f.read(numel * storage.dtype.itemsize)
            storage.data = _read_storage(raw, storage, "little", source)
    return _resolve(result, source)


def _flatten(obj, prefix: str, out: dict) -> dict:
    """Arrays of nested dicts under dotted keys; anything else (an epoch counter...) is skipped."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, dict):
            _flatten(value, name + ".", out)
    return out


def _is_tarfile(path: epath.Path) -> bool:
    with path.open("rb") as f:
        return tarfile.is_tarfile(f)


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict (nested dicts flattened to dotted keys), from
    a local path or a URL (gs://)."""
    path = paths.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as f:
        start = f.read(4)
    try:
        if start == b"PK\x03\x04":
            result = _load_zip(path)
        elif start[:1] == b"\x80":  # a binary pickle: the legacy stream
            result = _load_legacy(path)
        elif _is_tarfile(path):
            raise ValueError(
                f"{path}: a torch < 0.4 tar archive, which is not read here; {_RESAVE_HINT}"
            )
        else:
            raise ValueError(
                f"{path}: not a torch.save file (neither zip nor pickle); {_RESAVE_HINT}"
            )
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
        if isinstance(e, UnsafePickleError):
            raise
        raise ValueError(f"{path}: not a readable torch.save file ({e}); {_RESAVE_HINT}") from e
    if isinstance(result, np.ndarray):
        raise ValueError(f"{path}: holds a single tensor, not a state dict")
    if not isinstance(result, dict):
        raise ValueError(f"{path}: holds a {type(result).__name__}, not a state dict")
    tensors = _flatten(result, "", {})
    if not tensors:
        raise ValueError(f"{path}: no tensors in the saved dict")
    return tensors


def load_weights(path) -> dict[str, np.ndarray]:
    """Named arrays from `.safetensors`, `.npz` or a torch file (`.pth`, `.pt`, `.bin`...), at a
    local path or a URL (gs://)."""
    path = paths.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        with paths.local_copy(path) as file:  # safetensors reads only a local file name
            try:
                return load_file(str(file))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if path.suffix == ".npz":
        with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    return load_torch_state_dict(path)
