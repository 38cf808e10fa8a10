"""Tiny LLaMA folders for the delta tests, and the upstream merge computed with transformers as the reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, LAYERS = 64, 2


def tiny_config(vocab_size: int, hidden: int = HIDDEN, layers: int = LAYERS):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       tie_word_embeddings=False)


def save_model(folder: Path, config, seed: int, dtype=torch.float32, shard: str = "100KB", tokenizer=None,
               scale: float = 1.0, like: Path | None = None) -> Path:
    """A random LLaMA saved in several safetensors shards; with `like`, that model plus scaled noise."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if like is not None:
        original = LlamaForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(original.state_dict()[name] + scale * torch.randn_like(p) * p.std())
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def to_bin_shards(src: Path, dst: Path, shards: int) -> Path:
    """The same model as pytorch_model-*.bin shards with an index (the format of older releases)."""
    dst.mkdir(parents=True)
    state = load_folder(src)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, dst / file)
        weight_map.update({n: file for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and "index" not in f.name:
            shutil.copy(f, dst / f.name)
    return dst


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, through the safetensors library."""
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def load_folder_fp16(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t.to(torch.float16) for n, t in load_folder(folder).items()}


def reference_model(first: Path, second: Path, subtract: bool = False):
    """Upstream's algorithm: load both with from_pretrained in fp16, then add (or subtract) in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float16)
    other = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float16).state_dict()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if subtract:
                param.data -= other[name]
            else:
                param.data += other[name]
    return model


def reference_merge(first: Path, second: Path, subtract: bool = False) -> dict[str, torch.Tensor]:
    """The reference result as a state dict."""
    return {n: t.clone() for n, t in reference_model(first, second, subtract).state_dict().items()}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def edit_shard(folder: Path, edit) -> None:
    """Rewrite the shard holding the embeddings with edit(state) applied, keeping the index true."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file = index["weight_map"]["model.embed_tokens.weight"]
    state = load_file(folder / file)
    edit(state)
    save_file(state, folder / file, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file or n in state}
    index_path.write_text(json.dumps(index))


def leftovers(out: Path) -> list[str]:
    """What a failed run left beside (or at) its output path."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))
