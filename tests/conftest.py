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

    return load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu"))


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
