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


def test_auto_backend_is_llama_cpp_for_gguf_and_the_demo():
    from bayling.llama_loading import wants_llama_cpp

    assert wants_llama_cpp("auto", None) and wants_llama_cpp("auto", "/m/bayling-13b.Q4_K_M.gguf")
    assert not wants_llama_cpp("auto", "/m/bayling-13b") and not wants_llama_cpp("auto", "ICTNLP/bayling-13b-v1.1")
    assert not wants_llama_cpp("auto", None, ["--load-4bit"])  # a torch-only flag keeps auto on torch
    assert not wants_llama_cpp("torch", None) and not wants_llama_cpp("torch", "/m/x.gguf")
    assert wants_llama_cpp("llama.cpp", None) and wants_llama_cpp("llama.cpp", "/m/x.gguf")


def test_torch_only_flags_are_refused_on_llama_cpp(tmp_path):
    for flags, named in (({"load_4bit": True}, "--load-4bit"), ({"device": "cuda"}, "--device cuda"),
                         ({"dtype": "bfloat16"}, "--dtype bfloat16")):
        with pytest.raises(ModelLoadError, match=f"{named} applies to the torch backend only"):
            load_model(ModelArgs(backend="llama.cpp", **flags))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelArgs(model_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        load_model(ModelArgs(model_path=str(tmp_path), backend="llama.cpp"))
