"""A model folder's weights: find the shard files (safetensors or .bin, with or without an index),
list every tensor without loading it, and read tensors one at a time."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import DeltaError
from .formats import TensorInfo, read_elements, read_tensor, safetensors_tensors, torch_bin_tensors

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Buffers that transformers recomputes and ignores when loading (old LLaMA conversions saved them).
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
OFFLINE_VALUES = ("1", "true", "yes", "on")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class WeightSource:
    """The tensors of one model folder, in on-disk order, read lazily."""

    role: str  # "base", "delta" or "target": how messages name it
    folder: Path
    config: dict
    tensors: dict[str, TensorInfo]
    dropped: list[str] = field(default_factory=list)  # derived buffers left out
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    def read(self, name: str, start: int = 0, count: Optional[int] = None,
             into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The stored values of `name` (in its stored dtype): the whole tensor, or with count, elements
        [start, start + count) of it, flattened; read into the byte buffer `into` when given."""
        info = self.tensors[name]
        if info.file not in self._fds:
            try:
                self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            except OSError as e:
                raise DeltaError(f"cannot read {info.file}: {e.strerror or e}") from None
        if count is None:
            return read_tensor(info, self._fds[info.file], into)
        return read_elements(info, self._fds[info.file], start, count, into)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def locate_folder(path_or_id: str, role: str, revision: Optional[str] = None) -> Path:
    """A local model folder for --{role}-path: the path itself, or a hub id's snapshot."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DeltaError(f"the {role} path {path_or_id} is a file; pass the model's folder")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or not path_or_id.strip():
        raise DeltaError(f"the {role} folder {path_or_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES:
        raise DeltaError(f"{path_or_id} is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE is set; "
                         f"download it elsewhere and pass --{role}-path /path/to/local/folder")
    try:
        return Path(snapshot_download(path_or_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown or gated repo: one line, then the fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeltaError(f"could not fetch {path_or_id} from the Hugging Face hub ({first[:160]}); "
                         f"check the name and your network, or pass --{role}-path /path/to/local/folder") from None


def open_source(folder: Path, role: str) -> WeightSource:
    """List every tensor of a model folder (headers only); a missing or broken file is a DeltaError."""
    config = _read_config(folder, role)
    files, expected = _weight_files(folder, role)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        infos = torch_bin_tensors(path) if path.suffix == ".bin" else safetensors_tensors(path)
        for info in infos:
            if info.name in tensors:
                raise DeltaError(f"the {role} holds {info.name} twice ({tensors[info.name].file.name} and "
                                 f"{path.name}); remove the stray file")
            tensors[info.name] = info
    if expected is not None:
        absent = [n for n in expected if n not in tensors]
        if absent:
            raise DeltaError(f"the {role}'s index lists {len(absent)} tensors its shards lack, e.g. {absent[:3]}; "
                             "the download is incomplete or the index is stale")
        tensors = {n: t for n, t in tensors.items() if n in expected}
    dropped = [n for n in tensors if n.endswith(DERIVED_SUFFIXES)]
    for name in dropped:
        del tensors[name]
    if not tensors:
        raise DeltaError(f"the {role} folder {folder} holds no tensors")
    return WeightSource(role, folder, config, tensors, dropped)


def _read_config(folder: Path, role: str) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise DeltaError(f"the {role} folder {folder} is not a Hugging Face model folder (no config.json in it)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeltaError(f"cannot read the {role}'s {path}: {e}") from None
    if not isinstance(config, dict):
        raise DeltaError(f"the {role}'s {path} is not a JSON object")
    return config


def _weight_files(folder: Path, role: str) -> tuple[list[Path], Optional[set[str]]]:
    """The shard files to read and, when an index names them, the tensor names it promises."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DeltaError(f"cannot read the {role}'s {index} ({e}); re-download it") from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise DeltaError(f"the {role} is missing {len(missing)} of its {len(files)} shard files, "
                                 f"e.g. {missing[:3]}; the download is incomplete")
            return files, set(weight_map)
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files, None
    if list(folder.glob("adapter_model.*")):
        raise DeltaError(f"the {role} folder {folder} holds a LoRA adapter, not full weights or a weight diff")
    if list(folder.glob("*.pth")):
        raise DeltaError(f"the {role} folder {folder} is in Meta's original format (.pth); convert it with "
                         "transformers' convert_llama_weights_to_hf.py first")
    raise DeltaError(f"no weights in the {role} folder {folder} (expected model*.safetensors or pytorch_model*.bin)")
