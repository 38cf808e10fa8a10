"""The model side of every generating suite: flags, loading, prompts, and one engine run per suite.

A run submits rows to the one engine as it has room (continuous refill, no per-window barrier);
the next turn of a multi-turn row is submitted as soon as its previous answer is done, so turns of
different conversations are in flight together. Rows are written in order as they complete, so a
killed run resumes where it stopped. With --seed each answer gets its own seed derived from --seed,
the row's index and the turn: its output does not depend on --batch-size or on the resume point.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from ..cli import add_generation_args, params_from
from ..context import fit_conversation
from ..engine.driver import build_engine, to_chunk
from ..engine.request import OutputKind, Request
from ..loading import LoadedModel, add_model_args, engine_kwargs_from, load_model, model_args_from
from ..output import StreamChunk
from ..params import GenerationParams
from ..templates import ASSISTANT, USER, Conversation, Template, choose_template, params_for_template
from ..tokens import PromptTooLongError
from .io import ResumableWriter, progress

# finish_reason of a row whose prompt alone does not fit the context window (kept, never dropped)
FINISH_TOO_LONG = "prompt_too_long"
DEFAULT_BATCH_SIZE = 8
ROWS_AHEAD = 2  # rows in flight (or finished, waiting for an earlier row to be written) per --batch-size


def add_eval_model_args(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    """Model, template, sampling and batching flags. Evaluation defaults to greedy decoding."""
    add_model_args(parser)
    g = add_generation_args(parser, max_new_tokens, temperature=0.0)
    g.add_argument("--seed", type=int, default=None,
                   help="seed for sampling (temperature > 0); each answer's seed derives from it, its row and turn")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="answers decoded together (the engine's --max-num-seqs)")
    g.add_argument("--model-name", default=None,
                   help="name written into outputs and file names (default: the model's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def answer_seed(seed: int, row: int, turn: int) -> int:
    """A 63-bit seed for one answer, stable across runs, batch sizes and resumes."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{row}/{turn}".encode()).digest()[:8], "little") >> 1


@dataclass
class EvalModel:
    """A loaded model with its template and generation params, answering suites through the engine."""

    loaded: LoadedModel
    template: Template
    params: GenerationParams  # with the template's stops and de-anonymisation added
    batch_size: int = DEFAULT_BATCH_SIZE
    system: Optional[str] = None
    name: str = ""
    show_progress: bool = True
    seed: Optional[int] = None
    engine_kwargs: dict = field(default_factory=dict)
    _engine: Any = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "EvalModel":
        """Validate the flags (before loading anything), then load the model."""
        if ns.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {ns.batch_size}")
        params = params_from(ns)  # also checks --conv-template
        kwargs = {k: v for k, v in engine_kwargs_from(ns).items() if k != "max_num_seqs"}
        return cls.from_loaded(load_model(model_args_from(ns)), params, conv_template=ns.conv_template,
                               system=ns.system, batch_size=ns.max_num_seqs or ns.batch_size, name=ns.model_name,
                               show_progress=not ns.no_progress, seed=ns.seed, engine_kwargs=kwargs)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, params: GenerationParams, *, conv_template: Optional[str] = None,
                    system: Optional[str] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    name: Optional[str] = None, show_progress: bool = True, seed: Optional[int] = None,
                    engine_kwargs: Optional[dict] = None) -> "EvalModel":
        template = choose_template(loaded.name, conv_template)
        return cls(loaded, template, params_for_template(params, template, loaded.tokenizer), batch_size,
                   system, name or loaded.name, show_progress, seed, dict(engine_kwargs or {}))

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = build_engine(self.loaded.model, self.loaded.tokenizer, context_len=self.loaded.context_len,
                                        max_num_seqs=self.batch_size, **self.engine_kwargs)
        return self._engine

    def conversation(self, turns: Sequence[str], answers: Sequence[str] = ()) -> Conversation:
        """User turns interleaved with the answers so far; the next reply answers the last turn."""
        conv = Conversation(self.template, self.system)
        for i, turn in enumerate(turns):
            conv.add(USER, turn)
            if i < len(answers):
                conv.add(ASSISTANT, answers[i])
        return conv

    def params_for(self, row: int, turn: int) -> GenerationParams:
        if self.seed is None or self.params.greedy:
            return self.params
        return replace(self.params, seed=answer_seed(self.seed, row, turn))

    def run_rows(self, rows: list[Any], writer: ResumableWriter, turns_of: Callable[[Any], Sequence[str]],
                 output_of: Callable[[Any, list[StreamChunk]], Any], desc: str, unit: str = "answer") -> int:
        """Answer rows[writer.done:] turn by turn, writing output_of(row, answers) in row order."""
        engine = self.engine
        start = writer.done
        turns = {i: list(turns_of(rows[i])) for i in range(start, len(rows))}
        total = sum(len(turns_of(r)) for r in rows)
        answers: dict[int, list[StreamChunk]] = {i: [] for i in turns}
        in_flight: dict[str, int] = {}
        bar = progress(total, total - sum(len(t) for t in turns.values()), desc, self.show_progress, unit=unit)

        def advance(i: int) -> None:
            """Submit row i's next turn; a prompt that cannot fit is answered FINISH_TOO_LONG at once."""
            while len(answers[i]) < len(turns[i]):
                t = len(answers[i])
                conv = self.conversation(turns[i][:t + 1], [a.text for a in answers[i]])
                try:
                    fitted = fit_conversation(conv, self.loaded.tokenizer, engine.context_len,
                                              self.params.max_new_tokens)
                    rid = f"{i}/{t}"
                    engine.add_request(Request(rid, fitted.input_ids, self.params_for(i, t), OutputKind.FINAL,
                                               fitted.prompt))
                    in_flight[rid] = i
                    return
                except PromptTooLongError as e:
                    print(f"warning: {e}", file=sys.stderr)
                    answers[i].append(StreamChunk("", "", 0, 0, FINISH_TOO_LONG))
                    bar.update(1)

        next_row, written = start, start
        with bar, writer:
            while written < len(rows):
                while next_row < len(rows) and next_row - written < ROWS_AHEAD * self.batch_size:
                    advance(next_row)
                    next_row += 1
                for out in engine.step():
                    if not out.finished:
                        continue
                    if out.error is not None:
                        raise out.error
                    i = in_flight.pop(out.request_id)
                    answers[i].append(to_chunk(out))
                    bar.update(1)
                    advance(i)
                while written < next_row and len(answers[written]) == len(turns[written]):
                    writer.write(output_of(rows[written], answers.pop(written)))
                    written += 1
        return writer.done

    def run_single_turn(self, rows: list[Any], writer: ResumableWriter, prompt_of: Callable[[Any], str],
                        output_of: Callable[[Any, StreamChunk], Any], desc: str) -> int:
        """Answer rows[writer.done:] one instruction each, writing output_of(row, chunk) in order."""
        return self.run_rows(rows, writer, lambda row: [prompt_of(row)],
                             lambda row, answers: output_of(row, answers[0]), desc, unit="row")
