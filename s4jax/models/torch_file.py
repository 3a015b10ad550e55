"""Reads weight files into {name: np.ndarray} without PyTorch and without running their code.

Formats, recognised by their content (not by the file name):

- **PyTorch zip** (``torch.save`` since torch 1.6): a zip holding ``<dir>/data.pkl`` (the
  pickled object, whose storages are persistent ids) and ``<dir>/data/<key>`` (each storage's
  raw bytes).
- **PyTorch legacy** (``torch.save(..., _use_new_zipfile_serialization=False)`` and every
  file written before torch 1.6): five pickles in a row (magic number, protocol version,
  system info, the object, the list of storage keys), then each storage as a little-endian
  int64 element count followed by its raw bytes, in the order of that list.
- **.npz** (``numpy.savez``: a zip of ``.npy`` members; object arrays are refused).
- **.safetensors**: an 8-byte little-endian header length, a JSON header (dtype, shape and
  byte range of each tensor), then the raw data.

A pickle can call any Python function while it loads (``os.system`` is one opcode away), so
the unpickler here resolves only the handful of globals a tensor file needs: torch's tensor
and parameter rebuild functions, its storage classes and ``collections.OrderedDict``; it
builds its own placeholders for them and never imports torch. Anything else is refused by
name before it is called. Every problem is a `DataError` naming the file.
"""

import collections
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from s4jax.errors import DataError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_LOCAL_HEADER = b"PK\x03\x04"

# torch storage class -> element dtype (little-endian; swapped for big-endian files).
_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype("<f8"),
  "FloatStorage": np.dtype("<f4"),
  "HalfStorage": np.dtype("<f2"),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype("<i8"),
  "IntStorage": np.dtype("<i4"),
  "ShortStorage": np.dtype("<i2"),
  "CharStorage": np.dtype("i1"),
  "ByteStorage": np.dtype("u1"),
  "BoolStorage": np.dtype("?"),
}
_SAFETENSORS_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
# Keys under which training scripts commonly nest the weights in a checkpoint dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_NOT_A_WEIGHTS_FILE = (
  "is not a PyTorch checkpoint (zip or legacy torch.save), .npz or .safetensors file"
)


class _StorageType:
  """Stands in for a torch storage class such as ``torch.FloatStorage``."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
  """A storage named by a persistent id; its bytes are attached after unpickling."""

  def __init__(self, dtype: np.dtype, key: str, numel: int):
    self.dtype, self.key, self.numel = dtype, key, numel
    self.offset = 0  # elements into the root storage (legacy storage views)


class _TensorRef:
  """A tensor as its rebuild function describes it: storage, offset, size and strides."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


class _TypeMarker:
  """Stands in for ``torch.Tensor`` / ``torch.nn.Parameter`` in ``_rebuild_from_type_v2``."""


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  # The v2 extras (requires_grad, backward hooks, metadata) do not change the data.
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError("a tensor whose storage is not a storage")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type(func, new_type, args, state):
  del new_type, state  # a Parameter or Tensor subclass: only its data matters here
  return func(*args)


_ALLOWED_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
  ("torch", "Tensor"): _TypeMarker,
  ("torch.nn.parameter", "Parameter"): _TypeMarker,
}


class _RefusedGlobal(Exception):
  def __init__(self, module, name):
    super().__init__(f"{module}.{name}")
    self.qualified = f"{module}.{name}"


class _TensorUnpickler(pickle.Unpickler):
  """Resolves only tensor-rebuild globals; `storages` collects the storages it meets."""

  def __init__(self, file, big_endian: bool = False):
    super().__init__(file)
    self.big_endian = big_endian
    self.storages: dict[str, _StorageRef] = {}

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise _RefusedGlobal(module, name)

  def persistent_load(self, pid):
    if not (
      isinstance(pid, tuple)
      and len(pid) in (5, 6)
      and pid[0] == "storage"
      and isinstance(pid[1], _StorageType)
    ):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
    _, storage_type, key, _, numel, *view = pid
    dtype = storage_type.dtype.newbyteorder(">") if self.big_endian else storage_type.dtype
    root = self.storages.setdefault(str(key), _StorageRef(dtype, str(key), int(numel)))
    if view and view[0] is not None:  # legacy storage view: (view key, offset, size)
      _, offset, size = view[0]
      ref = _StorageRef(dtype, root.key, int(size))
      ref.offset = int(offset)
      return ref
    return root


def _unpickle(unpickler: _TensorUnpickler, path: str):
  try:
    return unpickler.load()
  except _RefusedGlobal as e:
    raise DataError(
      f"{path}: refusing to unpickle {e.qualified}: this reader rebuilds tensors only (only "
      "tensor data is accepted), so it never runs code stored in a weights file. If you "
      "trust the file, re-save its tensors alone (a state dict, .npz or .safetensors)."
    ) from None
  except (
    EOFError,
    pickle.UnpicklingError,
    struct.error,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
  ) as e:
    raise DataError(
      f"{path}: the pickled data is truncated or corrupt ({e}). Download or write the file again."
    ) from None


def _tensors(obj, path: str) -> dict:
  """The {name: _TensorRef} of a state dict, or of one nested under a usual key."""
  if isinstance(obj, dict):
    for key in _NESTED_STATE_KEYS:
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
    found = {str(k): v for k, v in obj.items() if isinstance(v, _TensorRef)}
    if found:
      return found
  raise DataError(
    f"{path}: holds no tensors by name (a {type(obj).__name__}, not a state dict of tensors)."
  )


def _materialise(tensor: _TensorRef, raw: dict, path: str, name: str) -> np.ndarray:
  storage = tensor.storage
  data = raw[storage.key]
  itemsize = storage.dtype.itemsize
  flat = np.frombuffer(data, storage.dtype, count=len(data) // itemsize)
  start = storage.offset + tensor.offset
  if tensor.size and min(tensor.size) == 0:
    return np.zeros(tensor.size, storage.dtype.newbyteorder("="))
  last = start + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
  if start < 0 or last >= len(flat) or min(tensor.stride, default=0) < 0:
    raise DataError(
      f"{path}: tensor {name!r} reaches past the end of its storage (a truncated or corrupt file)."
    )
  view = np.lib.stride_tricks.as_strided(
    flat[start:], shape=tensor.size, strides=[s * itemsize for s in tensor.stride]
  )
  return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _materialise_all(tensors: dict, raw: dict, path: str) -> dict:
  try:
    return {name: _materialise(t, raw, path, name) for name, t in tensors.items()}
  except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
    # Only a crafted or damaged pickle gets here (e.g. a tensor rebuilt from odd values).
    raise DataError(
      f"{path}: a tensor's description is inconsistent ({e}): a corrupt file."
    ) from None


def _read_legacy(path: str) -> dict:
  with open(path, "rb") as f:
    header = _TensorUnpickler(f)
    magic = _unpickle(header, path)
    if magic != _LEGACY_MAGIC:
      raise DataError(
        f"{path}: a Python pickle that {_NOT_A_WEIGHTS_FILE} (no torch.save magic number)."
      )
    protocol = _unpickle(header, path)
    if protocol != _LEGACY_PROTOCOL:
      raise DataError(
        f"{path}: legacy torch.save protocol {protocol!r} is not supported "
        f"(expected {_LEGACY_PROTOCOL})."
      )
    sys_info = _unpickle(header, path)
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    main = _TensorUnpickler(f, big_endian=big_endian)
    obj = _unpickle(main, path)
    keys = _unpickle(_TensorUnpickler(f), path)
    if not isinstance(keys, list):
      raise DataError(f"{path}: the storage key list is missing (a corrupt file).")
    raw = {}
    for key in keys:
      count_bytes = f.read(8)
      if len(count_bytes) < 8:
        raise DataError(f"{path}: the file ends before storage {key!r} (truncated).")
      count = struct.unpack("<q", count_bytes)[0]
      if count < 0:
        raise DataError(f"{path}: storage {key!r} has a negative size (a corrupt file).")
      ref = main.storages.get(str(key))
      if ref is None:
        raise DataError(f"{path}: storage {key!r} is listed but never used (a corrupt file).")
      nbytes = count * ref.dtype.itemsize
      data = f.read(nbytes)
      if len(data) < nbytes:
        raise DataError(
          f"{path}: storage {key!r} is cut short ({len(data)} of {nbytes} "
          "bytes): the file is truncated. Download or write it again."
        )
      raw[str(key)] = data
  missing = sorted(set(main.storages) - set(raw))
  if missing:
    raise DataError(f"{path}: storage {missing[0]!r} has no data (a truncated file).")
  return _materialise_all(_tensors(obj, path), raw, path)


def _read_torch_zip(path: str, archive: zipfile.ZipFile, pickle_name: str) -> dict:
  prefix = pickle_name[: -len("data.pkl")]
  names = set(archive.namelist())
  big_endian = False
  if f"{prefix}byteorder" in names:
    big_endian = archive.read(f"{prefix}byteorder").strip() == b"big"
  with archive.open(pickle_name) as f:
    unpickler = _TensorUnpickler(f, big_endian=big_endian)
    obj = _unpickle(unpickler, path)
  tensors = _tensors(obj, path)
  raw = {}
  for key in unpickler.storages:
    member = f"{prefix}data/{key}"
    if member not in names:
      raise DataError(
        f"{path}: storage {member} is missing from the archive (a truncated or corrupt file)."
      )
    raw[key] = archive.read(member)
  return _materialise_all(tensors, raw, path)


def _read_npz(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{path}: could not be read as .npz ({e}).") from None


def _read_safetensors(path: str, header_size: int) -> dict:
  with open(path, "rb") as f:
    f.seek(8)
    try:
      header = json.loads(f.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f"{path}: the .safetensors header is not valid JSON ({e}).") from None
    data = f.read()
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
      shape = tuple(int(s) for s in entry["shape"])
      begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise DataError(
        f"{path}: tensor {name!r} has an unreadable or unsupported header entry {entry!r:.120}."
      ) from None
    if end > len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise DataError(
        f"{path}: tensor {name!r} lies outside the data or does not match its "
        "shape (a truncated or corrupt file)."
      )
    out[name] = np.frombuffer(data[begin:end], dtype).reshape(shape).copy()
  return out


def _safetensors_header_size(path: str, head: bytes) -> int | None:
  if len(head) < 9 or head[8:9] != b"{":
    return None
  size = struct.unpack("<Q", head[:8])[0]
  return size if 8 + size <= os.path.getsize(path) else None


def _describe(head: bytes) -> str:
  """A few words on what a file that is not weights looks like, for the error message."""
  if not head:
    return "it is empty"
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError:
    return f"it starts with bytes {head[:8]!r}"
  first = text.strip().splitlines()[0][:40] if text.strip() else ""
  return f"it looks like a text file starting {first!r}"


def read_weights(path: str) -> dict[str, np.ndarray]:
  """{tensor name: np.ndarray} of a PyTorch (zip or legacy), .npz or .safetensors file.

  Raises DataError naming `path` for a missing, truncated or unrecognised file and for a
  pickle that would run anything other than tensor rebuilds.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file.")
  with open(path, "rb") as f:
    head = f.read(64)
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if pickles:
          return _read_torch_zip(path, archive, min(pickles, key=len))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise DataError(
        f"{path}: the zip archive is damaged ({e}); the file is probably "
        "truncated. Download or write it again."
      ) from None
    if names and all(n.endswith(".npy") for n in names):
      return _read_npz(path)
    raise DataError(
      f"{path}: a zip archive that {_NOT_A_WEIGHTS_FILE} (members such as {names[:3]})."
    )
  if head.startswith(_ZIP_LOCAL_HEADER):
    raise DataError(
      f"{path}: starts like a zip archive (a zip-format torch.save or .npz) but "
      "has no zip directory at its end: the file is truncated. Download or "
      "write it again."
    )
  if head[:1] == b"\x80":  # pickle protocol 2+ opcode: torch's legacy format starts so
    return _read_legacy(path)
  header_size = _safetensors_header_size(path, head)
  if header_size is not None:
    return _read_safetensors(path, header_size)
  raise DataError(f"{path} {_NOT_A_WEIGHTS_FILE}: {_describe(head)}.")
