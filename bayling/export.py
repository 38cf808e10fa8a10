"""A Hugging Face LLaMA folder as a (quantized) GGUF file, one tensor in memory at a time.

    python -m bayling.export --model-path HF_FOLDER --gguf OUT.gguf --quant Q4_K_M|Q5_K_M|Q8_0|F16

An F16 GGUF is written tensor by tensor with the `gguf` package (tensor infos first, then each tensor's data as
it is read), then quantized by llama.cpp's own quantizer. Everything is written in a temporary folder beside
OUT and renamed into place when complete; a failure, Ctrl-C or kill leaves nothing behind.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .delta.errors import DeltaError
from .delta.shards import WeightSource, open_source
from .delta.staging import StagingFolder
from .gguf_vocab import Vocab, VocabError, read_vocab

ARCH = "llama"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# llama.cpp's llama_ftype values
QUANTS = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
F16_FTYPE = QUANTS["F16"]
# HF name (after "model.layers.N.") -> GGUF name (after "blk.N.")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")


class ExportError(ValueError):
    """A request the export cannot carry out; the message says what to change."""


@dataclass(frozen=True)
class ExportJob:
    model_path: str
    gguf: str
    quant: str = "Q4_K_M"
    force: bool = False
    threads: int = 0  # llama.cpp's quantizer threads; 0 = all cores


@dataclass(frozen=True)
class ExportResult:
    path: Path
    tensors: int
    nbytes: int
    seconds: float

    def summary(self) -> str:
        return f"wrote {self.path}: {self.tensors} tensors, {self.nbytes / 1e6:.1f} MB in {self.seconds:.1f} s"


@dataclass(frozen=True)
class Hyper:
    """The LLaMA hyper-parameters GGUF records, read off config.json."""

    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_freq_base: float
    rms_eps: float
    vocab_size: int
    rope_scaling: Optional[float]  # linear scaling factor, if any


def export(job: ExportJob) -> ExportResult:
    """Check the folder, write the GGUF beside its destination and rename it into place."""
    start = time.perf_counter()
    if job.quant not in QUANTS:
        raise ExportError(f"unknown --quant {job.quant}; choose one of {', '.join(QUANTS)}")
    folder = Path(job.model_path).expanduser()
    out = Path(job.gguf).expanduser().absolute()
    if not folder.is_dir():
        raise ExportError(f"the model folder {folder} does not exist (pass a Hugging Face model folder)")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; pass the path of the .gguf file to write")
    if out.exists() and not job.force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or choose another path")
    if not out.parent.is_dir():
        raise ExportError(f"the folder {out.parent} for the output does not exist")
    try:
        with open_source(folder, "model") as source:
            hyper = read_hyper(source.config)
            vocab = read_vocab(folder, hyper.vocab_size, source.config)
            names = plan_names(source, hyper)
            # A staging folder beside out (removed on any failure, even a kill); only the file inside moves.
            with StagingFolder(out.with_name(out.name + ".export")) as tmp:
                f16 = tmp / "model-f16.gguf"
                write_f16(f16, source, names, hyper, vocab, folder.name)
                final = f16 if job.quant == "F16" else quantize(f16, tmp / "model.gguf", QUANTS[job.quant],
                                                                job.threads)
                nbytes = final.stat().st_size
                os.replace(final, out)  # same folder, so atomic
    except (DeltaError, VocabError) as e:
        raise ExportError(str(e)) from None
    return ExportResult(out, len(names), nbytes, time.perf_counter() - start)


def read_hyper(config: dict) -> Hyper:
    """LLaMA hyper-parameters from config.json; anything but a LLaMA is refused in one line."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportError(f"only LLaMA models (LlamaForCausalLM, model_type llama) can be exported; this one is "
                          f"{', '.join(archs) or 'unnamed'} (model_type {config.get('model_type')})")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    factor = None
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "linear":
            raise ExportError(f"rope scaling of type {kind!r} is not supported by this export (only linear)")
        factor = float(scaling["factor"])
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return Hyper(context_length=config.get("max_position_embeddings", 2048), embedding_length=hidden,
                 block_count=config["num_hidden_layers"], feed_forward_length=config["intermediate_size"],
                 head_count=heads, head_count_kv=config.get("num_key_value_heads") or heads,
                 head_dim=config.get("head_dim") or hidden // heads,
                 rope_freq_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                 rms_eps=float(config.get("rms_norm_eps", 1e-6)), vocab_size=config["vocab_size"],
                 rope_scaling=factor)


def plan_names(source: WeightSource, hyper: Hyper) -> dict[str, str]:
    """HF tensor name -> GGUF name for every tensor, checking that the set is exactly a LLaMA's."""
    names = {}
    for name in source.tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # derived; llama.cpp computes it
        layer = LAYER_PATTERN.fullmatch(name)
        if layer and layer.group(2) in LAYER_NAMES and int(layer.group(1)) < hyper.block_count:
            names[name] = f"blk.{layer.group(1)}.{LAYER_NAMES[layer.group(2)]}"
        elif name in GLOBAL_NAMES:
            names[name] = GLOBAL_NAMES[name]
        else:
            raise ExportError(f"unexpected tensor {name} for a LLaMA model; the folder is not a plain LLaMA")
    expected = {f"blk.{i}.{g}" for i in range(hyper.block_count) for g in LAYER_NAMES.values()}
    expected |= {"token_embd.weight", "output_norm.weight"}
    missing = expected - set(names.values())
    if missing:
        raise ExportError(f"the model lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    embd = source.tensors["model.embed_tokens.weight"].shape
    if embd != (hyper.vocab_size, hyper.embedding_length):
        raise ExportError(f"model.embed_tokens.weight is {tuple(embd)}, config.json says "
                          f"({hyper.vocab_size}, {hyper.embedding_length})")
    return names  # without lm_head (tied embeddings) llama.cpp reuses token_embd as the output


def to_gguf_array(name: str, values, hyper: Hyper) -> np.ndarray:
    """One HF tensor as the GGUF's array: norms in float32, matrices in float16, q/k rows re-ordered."""
    import torch

    # One conversion at most (none for fp16 matrices), so memory stays near one tensor's size.
    values = values.to(torch.float32 if values.dim() == 1 else torch.float16)
    if name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = hyper.head_count if name.endswith("attn_q.weight") else hyper.head_count_kv
        values = permute_rotary(values, heads)
    return values.contiguous().numpy()


def permute_rotary(weight, heads: int):
    """HF rotates the two halves of each head ([x0..x(d/2-1)], [x(d/2)..]); GGUF's LLaMA rotates adjacent
    pairs (x0, x1), (x2, x3)...: row h*d + s*d/2 + i moves to h*d + 2i + s."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_f16(path: Path, source: WeightSource, names: dict[str, str], hyper: Hyper, vocab: Vocab,
              model_name: str) -> None:
    """The F16 GGUF, holding one tensor in memory at a time."""
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)
    _add_metadata(writer, hyper, vocab, model_name)
    for hf_name, gguf_name in names.items():
        shape = source.tensors[hf_name].shape
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, gguf_name in names.items():  # the same order as the tensor infos
            writer.write_tensor_data(to_gguf_array(gguf_name, source.read(hf_name), hyper))
        writer.flush()
    finally:
        writer.close()


def _add_metadata(writer, hyper: Hyper, vocab: Vocab, model_name: str) -> None:
    writer.add_name(model_name)
    writer.add_context_length(hyper.context_length)
    writer.add_embedding_length(hyper.embedding_length)
    writer.add_block_count(hyper.block_count)
    writer.add_feed_forward_length(hyper.feed_forward_length)
    writer.add_head_count(hyper.head_count)
    writer.add_head_count_kv(hyper.head_count_kv)
    writer.add_rope_dimension_count(hyper.head_dim)
    if hyper.head_dim * hyper.head_count != hyper.embedding_length:
        writer.add_key_length(hyper.head_dim)
        writer.add_value_length(hyper.head_dim)
    writer.add_rope_freq_base(hyper.rope_freq_base)
    if hyper.rope_scaling is not None:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hyper.rope_scaling)
    writer.add_layer_norm_rms_eps(hyper.rms_eps)
    writer.add_vocab_size(hyper.vocab_size)
    writer.add_file_type(F16_FTYPE)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special_ids.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def quantize(f16: Path, out: Path, ftype: int, threads: int = 0) -> Path:
    """llama.cpp's quantizer: f16 -> out at ftype; f16 is removed once out is written."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), llama_cpp.byref(params))
    if code != 0:
        raise ExportError(f"llama.cpp's quantizer failed (code {code}) on {f16.name}")
    f16.unlink()
    return out


def parse_args(argv: list[str]) -> ExportJob:
    p = argparse.ArgumentParser(prog="python -m bayling.export",
                                description="Export a Hugging Face LLaMA folder to a (quantized) GGUF file.")
    p.add_argument("--model-path", required=True, help="a local Hugging Face model folder")
    p.add_argument("--gguf", required=True, help="the .gguf file to write")
    p.add_argument("--quant", default="Q4_K_M", choices=list(QUANTS), help="the GGUF's weight type")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--threads", type=int, default=0, help="quantizer threads (0 = all cores)")
    a = p.parse_args(argv)
    return ExportJob(model_path=a.model_path, gguf=a.gguf, quant=a.quant, force=a.force, threads=a.threads)


def main(argv: list[str]) -> int:
    """Run the export; errors are one line on stderr and exit code 2 (130 on Ctrl-C)."""
    from .cli import run_writing_job

    job = parse_args(argv)
    code, result = run_writing_job(lambda: export(job), ExportError)
    if result is not None:
        print(result.summary())
    return code


def console() -> None:
    """The console command `bayling-export`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console()
