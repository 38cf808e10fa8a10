"""What crosses the engine's boundary: a Request in, RequestOutputs out. No torch here."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..params import GenerationParams


class OutputKind(enum.Enum):
    """How a request wants its text (vLLM's RequestOutputKind)."""

    DELTA = "delta"  # each output carries only what is new since the last one
    CUMULATIVE = "cumulative"  # each output carries everything so far
    FINAL = "final"  # one output, when the sequence has finished


@dataclass(frozen=True)
class Logprob:
    """The chosen token's log-probability and the top alternatives, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), sorted by logprob descending


@dataclass(frozen=True)
class Request:
    """One prompt to answer. params.n > 1 asks for n independent answers (index 0..n-1)."""

    request_id: str
    prompt_ids: Sequence[int]
    params: GenerationParams
    output_kind: OutputKind = OutputKind.DELTA
    prompt_text: str = ""  # shown first when params.echo
    stream_interval: int = 1  # emit at most every N tokens (the final output always comes)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one answer of a request.

    text is the delta, the text so far, or the whole answer, as the request's OutputKind says;
    token_ids and logprobs follow the same rule. error is set (and finish_reason "error") when
    the step that ran this answer failed.
    """

    request_id: str
    index: int  # which of the request's n answers
    text: str
    token_ids: tuple[int, ...]
    logprobs: Optional[tuple[Logprob, ...]]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = field(default=None, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


FINISH_ERROR = "error"


class BudgetError(ValueError):
    """A request that can never fit the KV memory budget, even alone."""
