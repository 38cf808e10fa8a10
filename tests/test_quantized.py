"""bitsandbytes really loaded: 8-bit (LLM.int8) and 4-bit (NF4) on the CPU."""
import pytest
import torch

from bayling.loading import ModelArgs, load_model

PROMPT_IDS = [[5, 17, 42, 99, 7, 300, 12, 8]]


@pytest.fixture(scope="module")
def fp32_logits(tiny_llama_dir):
    lm = load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu"))
    with torch.no_grad():
        return lm.model(torch.tensor(PROMPT_IDS)).logits.float()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_load_8bit_logits_close_to_fp32(tiny_llama_dir, fp32_logits):
    import bitsandbytes as bnb

    lm = load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu", load_8bit=True))
    linear = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear8bitLt)  # really quantized, not silently fp32
    assert linear.weight.dtype == torch.int8
    with torch.no_grad():
        logits = lm.model(torch.tensor(PROMPT_IDS)).logits.float()
    # LLM.int8 keeps per-row absmax scales: a few percent of relative error on random weights.
    assert relative_error(logits, fp32_logits) < 0.03  # measured: about 0.011
    assert (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean() >= 0.75


def test_load_4bit_runs(tiny_llama_dir, fp32_logits):
    import bitsandbytes as bnb

    lm = load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu", load_4bit=True))
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = lm.model(torch.tensor(PROMPT_IDS)).logits.float()
    assert relative_error(logits, fp32_logits) < 0.25
