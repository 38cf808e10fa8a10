import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_bpe_tokenizer, build_spm_tokenizer, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    return build_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny random LLaMA with a byte-level BPE tokenizer, saved as a HF folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), bpe_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from bayling.loading import ModelArgs, load_model

    return load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu", backend="torch"))


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory, tiny_llama_dir):
    """The tiny random LLaMA exported to an F16 GGUF (same weights, for the llama.cpp backend)."""
    from bayling.export import main

    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.f16.gguf"
    assert main(["--model-path", str(tiny_llama_dir), "--gguf", str(out), "--quant", "F16"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_llama_cpp(tiny_llama_gguf):
    """The tiny random LLaMA's F16 GGUF loaded on the llama.cpp backend."""
    pytest.importorskip("llama_cpp")
    from bayling.loading import ModelArgs, load_model

    return load_model(ModelArgs(model_path=str(tiny_llama_gguf), backend="llama.cpp"))


@pytest.fixture(scope="session")
def demo_model():
    """The embedded demo model (SmolLM2-135M-Instruct) on the torch backend, loaded once per session."""
    from backends import demo

    return demo("torch")


@pytest.fixture(scope="session")
def demo_llama():
    """The demo model's GGUF on the llama.cpp backend, loaded once per session."""
    from backends import demo

    return demo("llama.cpp")
