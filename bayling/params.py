"""Generation parameters: one frozen value, validated once at the edge (CLI or HTTP)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


MIN_REPETITION_PENALTY = 1e-3


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one answer. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    echo: bool = False
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)
    # Released BayLing weights emit placeholders such as [NAME]; the BayLing templates turn this on.
    deanonymize: bool = False

    def __post_init__(self) -> None:
        # Normalise list inputs (JSON gives lists) so the value stays hashable and immutable.
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ValueError with a message a user can act on."""
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        # Below this, dividing a logit by the penalty can overflow float32 and the probabilities turn non-finite.
        if not _is_number(self.repetition_penalty) or self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number > 0 (at least {MIN_REPETITION_PENALTY}), "
                             f"got {self.repetition_penalty!r}")
        for name in ("echo", "ignore_eos", "deanonymize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")

    @classmethod
    def from_request(cls, request: Mapping[str, Any], **defaults: Any) -> "GenerationParams":
        """Build from a FastChat/OpenAI-style JSON dict; unknown keys are ignored, None means default."""
        names = {f.name for f in fields(cls)}
        values = dict(defaults)
        for key, value in request.items():
            if key in names and value is not None:
                values[key] = value
        if isinstance(values.get("stop"), str):
            values["stop"] = (values["stop"],)
        for key in ("temperature", "top_p", "repetition_penalty"):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        if isinstance(values.get("top_k"), int) and values["top_k"] < 0:
            values["top_k"] = 0  # FastChat sends top_k=-1 for "off"
        return cls(**values)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of {kind.__name__}, got {value!r}") from None
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ValueError(f"{name} must be a list of {kind.__name__}, got element {item!r}")
    return tuple(x for x in items if x != "")
