"""Tiny models and tokenizers built in the test session: no downloads, seconds on a CPU."""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "The capital of France is Paris. Translate this sentence into Chinese.",
    "I am an intelligent language assistant developed by the NLP Group of ICT/CAS.",
    "### Instruction:\n### Response:\n</s>",
    "你好，我是百聆，一个由中国科学院计算技术研究所开发的语言助手。",
    "今天天气很好，我们去公园散步吧。机器翻译是自然语言处理的重要任务。",
    "Emoji test: 😀 🚀 🐱 ❤️ 👍🏽 and café naïve résumé.",
    "[NAME] was created by [INSTITUTE] in [CREATE_TIME]. [名字] [机构] [开发时间]",
    "def add(a, b):\n    return a + b\n",
] * 4

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(vocab_size: int = 600, split: str = "gpt-2"):
    """A byte-level BPE tokenizer trained on CORPUS, splitting text before BPE as `split` says:
    "gpt-2" (GPT-2's regex), "smollm" (single digits, then GPT-2's regex, as SmolLM2) or "llama-bpe"
    (Llama 3's regex, merges ignored for whole-word tokens, as Llama 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bayling.gguf_vocab import LLAMA3_SPLIT

    tok = Tokenizer(models.BPE(ignore_merges=split == "llama-bpe"))
    tok.pre_tokenizer = {
        "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[split]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_spm_tokenizer(folder: Path, vocab_size: int = 700):
    """A LLaMA-style tokenizer: SentencePiece BPE with byte fallback, trained on CORPUS.

    transformers 5's LlamaTokenizer takes a vocab and merges; they are read off the trained
    SentencePiece model (merges ranked by the merged piece's id, as SentencePiece ranks them).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = sorted((vocab[p], vocab[p[:k]], vocab[p[k:]]) for p in vocab for k in range(1, len(p))
                    if p[:k] in vocab and p[k:] in vocab and not sp.is_byte(vocab[p]))
    pieces = {i: p for p, i in vocab.items()}
    return LlamaTokenizer(vocab=vocab, merges=[(pieces[a], pieces[b]) for _, a, b in merges])


def build_tiny_llama(folder: Path, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2,
                     max_positions: int = 256, dtype=None) -> Path:
    """A random LlamaForCausalLM saved with its tokenizer as an ordinary HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
