"""Model loading errors are one line a user can act on; the demo model is found and cached."""
import json

import pytest

from bayling.demo import DEMO_NAME, converted_gguf_folder, demo_gguf_path
from bayling.loading import ModelArgs, ModelLoadError, load_model, locate
from bayling.templates import Conversation, get_template


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ModelLoadError, match="is a 'BertForMaskedLM' model, not a causal language model"):
        load_model(ModelArgs(model_path=str(tmp_path), device="cpu"))


def test_missing_path_and_plain_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        locate(str(tmp_path / "nope"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        locate(str(tmp_path / "weights.txt"))


def test_hub_id_offline_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass --model-path /path/to/local/folder"):
        locate("ICTNLP/bayling-13b-v1.1")


def test_both_quantizations_refused(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="choose one of --load-8bit and --load-4bit"):
        load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu", load_8bit=True, load_4bit=True))


def test_tokenizer_template_needs_a_chat_template(spm_tokenizer):
    conv = Conversation(get_template("tokenizer"))
    conv.add("user", "hi")
    with pytest.raises(ValueError, match="has no chat_template; pass --conv-template"):
        conv.prompt_for_reply(spm_tokenizer)


def test_demo_model_cache_is_keyed_by_hash():
    gguf = demo_gguf_path()
    folder = converted_gguf_folder(gguf)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert converted_gguf_folder(gguf) == folder  # second call: no conversion, same folder
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    found, _, name, is_demo = locate(None)
    assert found == folder and name == DEMO_NAME and is_demo
