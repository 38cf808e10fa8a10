"""Tensor files read lazily: safetensors and PyTorch zip checkpoints (.bin), one tensor at a time.

Tensors are read with pread into buffers we own, not through a memory map: pages touched through
a mapping count toward the process's RSS until it is closed, so walking a 10 GB shard via mmap
holds up to 10 GB resident, while a pread costs only the tensor being read (page cache is not RSS).
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import DeltaError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The storage classes a torch.save pickle names (torch.HalfStorage, ...).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
HEADER_LEN_BYTES = 8
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ZIP_LOCAL_HEADER = 30  # fixed part of a zip local file header
READ_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read call


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a file; nothing is read until read_tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # byte offset of the first element
    span: int  # bytes to read from offset (more than nbytes only for a strided view)
    stride: Optional[tuple[int, ...]] = None  # element strides when not contiguous

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_tensor(info: TensorInfo, fd: int, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """info's values as a contiguous CPU tensor, in `into` (a big enough uint8 buffer) or a fresh one."""
    if info.stride is None:
        return read_elements(info, fd, 0, info.numel, into).view(info.shape)
    values = _pread(info, fd, info.offset, info.span, None).view(info.dtype)
    strided = values.as_strided(info.shape, info.stride)
    if into is None:
        return strided.contiguous()
    out = into[:info.nbytes].view(info.dtype).view(info.shape)
    out.copy_(strided)
    return out


def read_elements(info: TensorInfo, fd: int, start: int, count: int,
                  into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Elements [start, start + count) of a contiguous tensor, flat, in `into` or a fresh buffer."""
    assert info.stride is None, "a strided tensor is read whole"
    size = info.dtype.itemsize
    return _pread(info, fd, info.offset + start * size, count * size, into).view(info.dtype)


def _pread(info: TensorInfo, fd: int, offset: int, nbytes: int, into: Optional[torch.Tensor]) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8) if into is None else into[:nbytes]
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        try:
            n = os.preadv(fd, [view[done:done + READ_CHUNK]], offset + done)
        except OSError as e:  # an I/O error here is the input's fault, not the output's
            raise DeltaError(f"cannot read {info.name} from {info.file}: {e.strerror or e}") from None
        if n == 0:
            raise DeltaError(f"{info.file} ended while reading {info.name}: the file changed or is truncated")
        done += n
    return buf


def safetensors_tensors(path: Path) -> list[TensorInfo]:
    """The tensors a .safetensors file holds, in file order; a truncated or corrupt file is a DeltaError."""
    size = _size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_LEN_BYTES)
            n = int.from_bytes(head, "little") if len(head) == HEADER_LEN_BYTES else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - HEADER_LEN_BYTES):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except OSError as e:
        raise DeltaError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise DeltaError(f"{path} is not a valid safetensors file (truncated or corrupt header); "
                         "re-download or re-create it") from None
    start = HEADER_LEN_BYTES + n
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DeltaError(f"{path}: tensor {name} has an unreadable header entry {entry!r}") from None
        if end - begin != prod(shape) * dtype.itemsize:
            raise DeltaError(f"{path}: tensor {name} has {end - begin} bytes for shape {list(shape)}; "
                             "the file is corrupt")
        infos.append(TensorInfo(name, dtype, shape, path, start + begin, end - begin))
    infos.sort(key=lambda t: t.offset)
    needed = max((t.offset + t.span for t in infos), default=start)
    if needed > size:
        raise DeltaError(f"{path} is truncated: its header describes {needed} bytes but the file has {size}; "
                         "re-download it")
    return infos


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str


@dataclass(frozen=True)
class _LazyTensor:
    storage: _Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: Any, stride: Any, *_: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _LazyUnpickler(pickle.Unpickler):
    """Reads a torch.save'd state dict into _LazyTensors; refuses every other global, so no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"unsupported object {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        return _Storage(pid[1].dtype, str(pid[2]))


def torch_bin_tensors(path: Path) -> list[TensorInfo]:
    """The tensors a torch.save'd state dict (.bin, zip format) holds, located without loading them."""
    size = _size(path)
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise DeltaError(f"{path} is not a PyTorch checkpoint (no data.pkl inside)")
            prefix = pkl[: -len("data.pkl")]
            names = set(zf.namelist())
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder").decode().strip() != "little":
                raise DeltaError(f"{path} was saved on a big-endian machine; re-save it on this one")
            state = _LazyUnpickler(zf.open(pkl)).load()
            entries = {info.filename: info for info in zf.infolist()}
    except zipfile.BadZipFile as e:
        if _is_legacy_torch_file(path):
            raise DeltaError(f"{path} uses PyTorch's pre-1.6 format; load and re-save it with torch.save, "
                             "or convert it to safetensors") from None
        raise DeltaError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {e}); "
                         "re-download it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise DeltaError(f"{path} is not a plain state dict of tensors ({e}); convert it to safetensors") from None
    except OSError as e:
        raise DeltaError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, _LazyTensor) for v in state.values()):
        raise DeltaError(f"{path} is not a plain state dict of tensors; convert it to safetensors")
    data_offsets: dict[str, int] = {}
    infos = []
    for name, lazy in state.items():
        key = lazy.storage.key
        entry = entries.get(f"{prefix}data/{key}")
        if entry is None or entry.compress_type != zipfile.ZIP_STORED:
            raise DeltaError(f"{path}: the storage of {name} is missing or compressed; re-download the file")
        if key not in data_offsets:
            data_offsets[key] = _zip_data_offset(path, entry)
        if data_offsets[key] + entry.file_size > size:
            raise DeltaError(f"{path} is truncated inside tensor {name}; re-download it")
        infos.append(_locate(name, lazy, path, data_offsets[key], entry.file_size))
    return infos


def _locate(name: str, lazy: _LazyTensor, path: Path, data_offset: int, storage_bytes: int) -> TensorInfo:
    itemsize = lazy.storage.dtype.itemsize
    numel = prod(lazy.shape)
    # Elements a strided view reaches: 1 + sum((size - 1) * stride); the storage must hold them.
    reach = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(lazy.shape, lazy.stride))
    if (lazy.storage_offset + reach) * itemsize > storage_bytes:
        raise DeltaError(f"{path}: tensor {name} reaches past its storage; the file is corrupt")
    contiguous = lazy.stride == _contiguous_strides(lazy.shape) or numel <= 1
    return TensorInfo(name, lazy.storage.dtype, lazy.shape, path, data_offset + lazy.storage_offset * itemsize,
                      reach * itemsize, None if contiguous else lazy.stride)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _zip_data_offset(path: Path, entry: zipfile.ZipInfo) -> int:
    # The central directory gives where the local header starts; its name and extra fields
    # (which torch uses to align the data) have their own lengths there.
    with open(path, "rb") as f:
        f.seek(entry.header_offset)
        local = f.read(ZIP_LOCAL_HEADER)
    if len(local) < ZIP_LOCAL_HEADER or local[:4] != b"PK\x03\x04":
        raise DeltaError(f"{path} is corrupt (bad zip entry {entry.filename}); re-download it")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    return entry.header_offset + ZIP_LOCAL_HEADER + name_len + extra_len


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"  # a bare pickle stream: torch.save before 1.6


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DeltaError(f"cannot read {path}: {e.strerror or e}") from None
