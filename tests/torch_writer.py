"""Writes torch.save files (zip and legacy) from NumPy arrays, without PyTorch, for tests.

The byte layout follows torch/serialization.py: tensors pickle as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``, the
storage as a persistent id ``("storage", torch.<Type>Storage, key, "cpu", numel[, view])``.
The pure-Python pickler writes those torch globals by name (torch need not be importable).
"""

import collections
import io
import json
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_NAMES = {
  np.dtype("float32"): "FloatStorage",
  np.dtype("float64"): "DoubleStorage",
  np.dtype("float16"): "HalfStorage",
  np.dtype("int64"): "LongStorage",
  np.dtype("int32"): "IntStorage",
  np.dtype("uint8"): "ByteStorage",
  np.dtype("bool"): "BoolStorage",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class Global:
  """A global written as ``module.name`` into the pickle (called only by an unpickler)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called when writing")


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage, array):
    self.storage, self.shape = storage, array.shape
    # C-contiguous strides in elements, as torch records them.
    self.stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()

  def __reduce_ex__(self, protocol):
    return (
      Global("torch._utils", "_rebuild_tensor_v2"),
      (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()),
    )


class Evil:
  """Unpickling this calls `module.name(argument)` (say os.system) in a plain unpickler."""

  def __init__(self, module, name, argument):
    self.function, self.argument = Global(module, name), argument

  def __reduce_ex__(self, protocol):
    return (self.function, (self.argument,))


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    pid = (
      "storage",
      Global("torch", _STORAGE_NAMES[obj.array.dtype]),
      obj.key,
      "cpu",
      obj.array.size,
    )
    return pid + (None,) if self.legacy else pid


def _tensors(state_dict):
  """{name: _Tensor} and the storages in order of first use."""
  tensors, storages = collections.OrderedDict(), []
  for name, value in state_dict.items():
    if isinstance(value, Evil):
      tensors[name] = value
      continue
    array = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-d)
    storage = _Storage(str(len(storages)), array)
    storages.append(storage)
    tensors[name] = _Tensor(storage, array)
  return tensors, storages


def _pickle(obj, legacy) -> bytes:
  buffer = io.BytesIO()
  _Pickler(buffer, legacy).dump(obj)
  return buffer.getvalue()


def legacy_bytes(state_dict) -> bytes:
  """The bytes torch.save(..., _use_new_zipfile_serialization=False) writes."""
  tensors, storages = _tensors(state_dict)
  out = io.BytesIO()
  for header in (
    LEGACY_MAGIC,
    1001,
    {
      "protocol_version": 1001,
      "little_endian": True,
      "type_sizes": {"short": 2, "int": 4, "long": 4},
    },
  ):
    pickle.dump(header, out, protocol=2)
  out.write(_pickle(tensors, legacy=True))
  pickle.dump([s.key for s in storages], out, protocol=2)
  for storage in storages:
    out.write(struct.pack("<q", storage.array.size))
    out.write(storage.array.astype(storage.array.dtype.newbyteorder("<")).tobytes())
  return out.getvalue()


def zip_bytes(state_dict, folder="archive") -> bytes:
  """The bytes torch.save writes (the zip format of torch >= 1.6)."""
  tensors, storages = _tensors(state_dict)
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{folder}/data.pkl", _pickle(tensors, legacy=False))
    archive.writestr(f"{folder}/byteorder", "little")
    for storage in storages:
      archive.writestr(f"{folder}/data/{storage.key}", storage.array.tobytes())
    archive.writestr(f"{folder}/version", "3\n")
  return out.getvalue()


def safetensors_bytes(state_dict) -> bytes:
  codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
  header, data = {}, b""
  for name, value in state_dict.items():
    value = np.array(value, order="C")
    header[name] = {
      "dtype": codes[value.dtype],
      "shape": list(value.shape),
      "data_offsets": [len(data), len(data) + value.nbytes],
    }
    data += value.tobytes()
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + data
