"""Checks run before any arithmetic: are these two weight sets the two halves of one merge?"""
from __future__ import annotations

from .errors import DeltaError
from .shards import WeightSource

# Config keys that must agree: a different value means a different model size.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
VOCAB_KEY = "vocab_size"
EXAMPLES = 3  # names listed in a message


def check_pair(first: WeightSource, second: WeightSource) -> None:
    """Raise DeltaError, naming tensors and shapes, unless `second` can be added to or subtracted from `first`."""
    check_configs(first, second)
    check_names(first, second)
    check_shapes(first, second)
    check_dtypes(first, second)


def check_configs(a: WeightSource, b: WeightSource) -> None:
    diffs = [f"{key} {a.config[key]} vs {b.config[key]}" for key in SHAPE_KEYS
             if key in a.config and key in b.config and a.config[key] != b.config[key]]
    if diffs:
        raise DeltaError(f"the {a.role} and the {b.role} are different model sizes ({a.role} vs {b.role}: "
                         f"{', '.join(diffs)}); pass the base the delta was made from, e.g. LLaMA-13B for a 13B delta")


def check_names(a: WeightSource, b: WeightSource) -> None:
    only_a = [n for n in a.tensors if n not in b.tensors]
    only_b = [n for n in b.tensors if n not in a.tensors]
    problems = [f"{_tensors(len(names))} in the {x.role} but not in the {y.role}, e.g. {names[:EXAMPLES]}"
                for names, x, y in ((only_a, a, b), (only_b, b, a)) if names]
    if problems:
        raise DeltaError("; ".join(problems) + " (a different architecture, or an incomplete download?)")


def check_shapes(a: WeightSource, b: WeightSource) -> None:
    bad = [n for n, t in a.tensors.items() if t.shape != b.tensors[n].shape]
    vocab = a.config.get(VOCAB_KEY), b.config.get(VOCAB_KEY)
    if bad:
        name = bad[0]
        more = f" (and {len(bad) - 1} more, e.g. {bad[1:1 + EXAMPLES]})" if len(bad) > 1 else ""
        hint = "; pass the base the delta was made from"
        if vocab[0] != vocab[1]:
            hint = (f"; vocab_size is {vocab[0]} in the {a.role} and {vocab[1]} in the {b.role}: the embeddings "
                    "were resized for added tokens, so use the base the delta was made from")
        raise DeltaError(f"shape mismatch in {name}: {list(a.tensors[name].shape)} in the {a.role} vs "
                         f"{list(b.tensors[name].shape)} in the {b.role}{more}{hint}")
    if None not in vocab and vocab[0] != vocab[1]:
        raise DeltaError(f"vocab_size is {vocab[0]} in the {a.role}'s config.json but {vocab[1]} in the "
                         f"{b.role}'s; pass the base the delta was made from")


def check_dtypes(a: WeightSource, b: WeightSource) -> None:
    for source in (a, b):
        bad = [n for n, t in source.tensors.items() if not t.dtype.is_floating_point]
        if bad:
            raise DeltaError(f"the {source.role} holds non-float tensors, e.g. {bad[0]} "
                             f"({source.tensors[bad[0]].dtype}); only floating-point weights can be merged")


def _tensors(n: int) -> str:
    return "1 tensor is" if n == 1 else f"{n} tensors are"
