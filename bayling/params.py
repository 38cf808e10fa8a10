"""Generation parameters: one frozen value, validated once at the edge (CLI or HTTP)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs


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
    # OpenAI's penalties: subtract presence_penalty once and frequency_penalty per occurrence of a
    # token in the answer so far (not the prompt); repetition_penalty looks at prompt + answer.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in -100..100), sorted by id
    seed: Optional[int] = None  # same seed, same answer, whatever else runs in the batch
    logprobs: Optional[int] = None  # None = off; N = the chosen token's logprob and the top N (<= 20)
    n: int = 1  # independent answers to one prompt (the prompt is prefilled once)

    def __post_init__(self) -> None:
        # Normalise list inputs (JSON gives lists) so the value stays hashable and immutable.
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        object.__setattr__(self, "logit_bias", _as_bias(self.logit_bias))
        for key in ("presence_penalty", "frequency_penalty"):
            if isinstance(getattr(self, key), int) and not isinstance(getattr(self, key), bool):
                object.__setattr__(self, key, float(getattr(self, key)))
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
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{key} must be a number in [-2, 2] (as OpenAI's API), got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (top alternatives), "
                             f"got {self.logprobs!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")

    @property
    def penalized(self) -> bool:
        """True when the sampler must track which tokens this sequence has seen."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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
        for key in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if isinstance(values.get(key), int) and not isinstance(values.get(key), bool):
                values[key] = float(values[key])
        if isinstance(values.get("top_k"), int) and values["top_k"] < 0:
            values["top_k"] = 0  # FastChat sends top_k=-1 for "off"
        return cls(**values)


def _is_number(x: Any) -> bool:
    # x - x == 0 rejects NaN and both infinities
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x - x == 0


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as OpenAI sends it ({"123": 5}) or pairs -> sorted ((123, 5.0),)."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = {}
    try:
        for key, bias in items:
            token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
            if not _is_number(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {key}")
            out[token] = float(bias)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("logit_bias"):
            raise
        raise ValueError(f"logit_bias must map token ids to numbers, got {value!r}") from None
    return tuple(sorted(out.items()))


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
