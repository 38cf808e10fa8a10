"""Loading a model: a local folder, a hub id, a .gguf file, or nothing (the demo model)."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .llama_loading import BACKENDS, wants_llama_cpp
from .demo import BAYLING_HINT, DEMO_NAME, converted_gguf_folder, demo_gguf_path

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line a user can act on."""


@dataclass(frozen=True)
class ModelArgs:
    """The model flags every script shares."""

    model_path: Optional[str] = None  # None = the embedded demo model
    device: str = "auto"
    dtype: str = "auto"
    load_8bit: bool = False
    load_4bit: bool = False
    gpus: Optional[str] = None
    num_gpus: int = 1
    max_gpu_memory: Optional[str] = None
    cpu_offloading: bool = False
    revision: str = "main"
    backend: str = "auto"  # auto (llama.cpp for a .gguf / the demo model) | torch | llama.cpp
    threads: Optional[int] = None  # CPU threads; None = every core this process may use

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # what templates and the worker call the model
    path: str  # where its files came from
    device: Any
    context_len: int
    is_demo: bool = False


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the shared model flags to a script's parser."""
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", default=None,
                   help="local folder, hub id or .gguf file (default: the embedded demo model)")
    g.add_argument("--revision", default="main", help="hub revision")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto = cuda when available")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto = float16 on GPUs, float32 on the CPU")
    g.add_argument("--load-8bit", action="store_true", help="bitsandbytes LLM.int8 (CUDA and CPU)")
    g.add_argument("--load-4bit", action="store_true", help="bitsandbytes NF4 (a 13B model in well under 16 GB)")
    g.add_argument("--gpus", default=None, help="visible GPUs, e.g. '0,1'")
    g.add_argument("--num-gpus", type=int, default=1, help="split the model over this many GPUs")
    g.add_argument("--max-gpu-memory", default=None, help="per-GPU cap with --num-gpus, e.g. '13GiB'")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="llama.cpp runs a .gguf file natively; torch runs transformers (a .gguf is converted "
                        "once to a safetensors cache); auto = llama.cpp for a .gguf file and the demo model "
                        "(torch if a torch-only flag such as --load-4bit or --device cuda is given), "
                        "torch for Hugging Face folders and hub ids")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads the model computes with (llama.cpp's -t; torch's intra-op threads); "
                        "default: every core this process may use. Fewer leave cores to other programs: "
                        "llama.cpp's threads wait for each other by spinning, so sharing cores slows it a lot")
    g.add_argument("--cpu-offloading", action="store_true",
                   help="with --load-8bit: put what does not fit on the GPU on the CPU")
    e = parser.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="most answers decoded together (default 16 for servers, n for chat and one-shot answers; "
                        "eval: --batch-size)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens one step feeds the model, prompt chunks plus decodes (default 512)")
    e.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache budget, e.g. 2GiB (default: CUDA memory x --gpu-memory-utilization "
                        "less the weights; 1/8 of RAM on the CPU). llama.cpp splits it evenly over "
                        "--max-num-seqs sequences (default there: each gets the model's window, at most "
                        "4096 tokens, within 1/8 of RAM)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory the weights, activations and KV cache may use (default 0.9)")


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "k": 2**10, "m": 2**20, "g": 2**30}
    t = text.strip().lower()
    number = t.rstrip("kmgib")
    unit = t[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB or 512MB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be > 0, got {text!r}")
    return int(value)


def engine_kwargs_from(ns: argparse.Namespace, answers: Optional[int] = None) -> dict:
    """The engine flags as build_engine keyword arguments. `answers`: the sequences a one-user tool
    (chat, api.py) runs at once, the --max-num-seqs default there (llama.cpp gives each slot a KV stream)."""
    kwargs = {k: getattr(ns, k, None) for k in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory",
                                                 "gpu_memory_utilization")}
    kwargs["max_num_seqs"] = kwargs["max_num_seqs"] or answers
    return kwargs


def model_args_from(ns: argparse.Namespace) -> ModelArgs:
    """Pick the ModelArgs fields out of a parsed namespace."""
    return ModelArgs(**{f.name: getattr(ns, f.name) for f in fields(ModelArgs) if hasattr(ns, f.name)})


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, dtype)


def _looks_like_path(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else the user meant as a file or folder.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf") or os.sep == "\\"


def locate(model_path: Optional[str], revision: str = "main") -> tuple[Path, Optional[str], str, bool]:
    """Turn --model-path into (folder, gguf file name or None, model name, is_demo)."""
    if model_path is None:
        gguf = demo_gguf_path()
        print(f"Using the demo model {DEMO_NAME} (CPU-friendly, 135M parameters); {BAYLING_HINT}.",
              file=sys.stderr)
        return converted_gguf_folder(gguf), None, DEMO_NAME, True
    path = Path(model_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf_folder(path.resolve()), None, path.stem, False
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{model_path} is not a Hugging Face model folder (no config.json in it)")
        return path, None, path.resolve().name, False
    if path.exists():
        raise ModelLoadError(f"{model_path} is a file but not a .gguf model; pass a model folder or a .gguf file")
    if _looks_like_path(model_path):
        raise ModelLoadError(f"model path {model_path} does not exist")
    return _from_hub(model_path, revision), None, model_path.rsplit("/", 1)[-1], False


def _from_hub(repo_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "ON", "YES"):
        raise ModelLoadError(f"{repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                             "download it elsewhere and pass --model-path /path/to/local/folder")
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                      "*.bin", "*.tiktoken"]))
    except Exception as e:  # network down, unknown repo, gated repo: one line, then the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not fetch {repo_id} from the Hugging Face hub ({first[:160]}); "
                             "check the name and your network, or pass --model-path /path/to/local/folder") from None


def _check_causal_lm(folder: Path, model_path: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(f"{model_path}: cannot read its config.json ({str(e).splitlines()[0][:160]})") from None
    architectures = getattr(config, "architectures", None) or []
    causal_arch = any("CausalLM" in a or "LMHeadModel" in a for a in architectures)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not causal_arch):
        what = architectures[0] if architectures else config.model_type
        raise ModelLoadError(f"{model_path} is a '{what}' model, not a causal language model")
    return config


def quantization_config(args: ModelArgs, compute_dtype: Any) -> Any:
    """The bitsandbytes config for --load-8bit / --load-4bit, or None."""
    if not (args.load_8bit or args.load_4bit):
        return None
    if args.load_8bit and args.load_4bit:
        raise ModelLoadError("choose one of --load-8bit and --load-4bit")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as e:
        raise ModelLoadError(f"--load-8bit/--load-4bit need bitsandbytes ({e}); pip install bitsandbytes") from None
    if args.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=args.cpu_offloading)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(args: ModelArgs) -> LoadedModel:
    """Load model and tokenizer as the flags ask; every failure is a one-line ModelLoadError."""
    if args.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus  # before CUDA starts: torch initialises it lazily
    torch_flags = torch_only_flags(args)
    if wants_llama_cpp(args.backend, args.model_path, torch_flags):
        if torch_flags:
            raise ModelLoadError(f"{torch_flags[0]} applies to the torch backend only; drop it, or pass "
                                 "--backend torch (a .gguf file is then converted to a safetensors cache)")
        return _load_llama_cpp(args)
    # Find the files first: a wrong path fails at once, before torch is even imported.
    folder, gguf_file, name, is_demo = locate(args.model_path, args.revision)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = _check_causal_lm(folder, args.model_path or name)
    quant = quantization_config(args, dtype if device != "cpu" else torch.bfloat16)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device == "cuda" and (args.num_gpus > 1 or args.cpu_offloading):
        kwargs["device_map"] = "auto"
        if args.max_gpu_memory:
            kwargs["max_memory"] = {i: args.max_gpu_memory for i in range(args.num_gpus)}
    elif quant is not None:
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {args.model_path or name}: {msg[:200]}") from None
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    ctx = getattr(config, "max_position_embeddings", None) or 2048
    return LoadedModel(model, tokenizer, name, str(folder), torch.device(device if device != "cuda" else "cuda:0"),
                       int(ctx), is_demo)


def torch_only_flags(args: ModelArgs) -> list[str]:
    """The flags given that only the torch backend honours (llama.cpp runs the GGUF's own weights on the CPU)."""
    flags = [("--load-8bit", args.load_8bit), ("--load-4bit", args.load_4bit),
             (f"--dtype {args.dtype}", args.dtype != "auto"),
             (f"--device {args.device}", args.device not in ("auto", "cpu")),
             (f"--num-gpus {args.num_gpus}", args.num_gpus > 1), ("--max-gpu-memory", bool(args.max_gpu_memory)),
             ("--cpu-offloading", args.cpu_offloading)]
    return [name for name, given in flags if given]


def _load_llama_cpp(args: ModelArgs) -> LoadedModel:
    """The GGUF file itself, run by llama.cpp: no safetensors conversion, no torch import here."""
    from .llama_loading import load_gguf

    if args.model_path is None:
        path, name, is_demo = demo_gguf_path(), DEMO_NAME, True
        print(f"Using the demo model {DEMO_NAME} on llama.cpp; {BAYLING_HINT}.", file=sys.stderr)
    else:
        path, is_demo = Path(args.model_path).expanduser(), False
        if not path.exists():
            raise ModelLoadError(f"model path {args.model_path} does not exist")
        if not (path.is_file() and path.suffix == ".gguf"):
            raise ModelLoadError(f"--backend llama.cpp needs a .gguf file, got {args.model_path} "
                                 "(export one with python -m bayling.export)")
        name = path.stem
    try:
        model, tokenizer = load_gguf(path, threads=args.threads)
    except ImportError:
        raise ModelLoadError("--backend llama.cpp needs llama-cpp-python (make setup builds it)") from None
    except RuntimeError as e:
        raise ModelLoadError(str(e)) from None
    return LoadedModel(model, tokenizer, name, str(path), "cpu", model.context_len, is_demo)
