"""The model side of every generating suite: flags, loading, prompts, batched replies, resumable runs."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..context import fit_conversation
from ..generation import PromptTooLongError
from ..cli import add_generation_args, params_from
from ..loading import LoadedModel, add_model_args, load_model, model_args_from
from ..output import StreamChunk
from ..params import GenerationParams
from ..templates import ASSISTANT, USER, Conversation, Template, choose_template, params_for_template
from .batch import generate_batch
from .io import ResumableWriter, progress, windows

# finish_reason of a row whose prompt alone does not fit the context window (kept, never dropped)
FINISH_TOO_LONG = "prompt_too_long"
DEFAULT_BATCH_SIZE = 8


def add_engine_args(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    """Model, template, sampling and batching flags. Evaluation defaults to greedy decoding."""
    add_model_args(parser)
    g = add_generation_args(parser, max_new_tokens, temperature=0.0)
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="prompts decoded together in one forward pass per step")
    g.add_argument("--model-name", default=None,
                   help="name written into outputs and file names (default: the model's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Engine:
    """A loaded model with its template and generation params; answers conversations in batches."""

    loaded: LoadedModel
    template: Template
    params: GenerationParams  # with the template's stops and de-anonymisation added
    batch_size: int = DEFAULT_BATCH_SIZE
    system: Optional[str] = None
    name: str = ""
    show_progress: bool = True
    generator: Any = None

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "Engine":
        """Validate the flags (before loading anything), then load the model."""
        if ns.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {ns.batch_size}")
        params = params_from(ns)  # also checks --conv-template
        return cls.from_loaded(load_model(model_args_from(ns)), params, conv_template=ns.conv_template,
                               system=ns.system, batch_size=ns.batch_size, name=ns.model_name,
                               show_progress=not ns.no_progress, seed=ns.seed)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, params: GenerationParams, *, conv_template: Optional[str] = None,
                    system: Optional[str] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    name: Optional[str] = None, show_progress: bool = True, seed: Optional[int] = None) -> "Engine":
        template = choose_template(loaded.name, conv_template)
        generator = None
        if seed is not None:
            import torch

            generator = torch.Generator(device=loaded.device).manual_seed(seed)
        return cls(loaded, template, params_for_template(params, template, loaded.tokenizer), batch_size,
                   system, name or loaded.name, show_progress, generator)

    def conversation(self, turns: Sequence[str], answers: Sequence[str] = ()) -> Conversation:
        """User turns interleaved with the answers so far; the next reply answers the last turn."""
        conv = Conversation(self.template, self.system)
        for i, turn in enumerate(turns):
            conv.add(USER, turn)
            if i < len(answers):
                conv.add(ASSISTANT, answers[i])
        return conv

    def reply(self, conversations: Sequence[Conversation],
              on_row_done: Optional[Callable[[int], None]] = None) -> list[StreamChunk]:
        """One batched reply per conversation, in order. A prompt that cannot fit gets FINISH_TOO_LONG."""
        tok, ctx = self.loaded.tokenizer, self.loaded.context_len
        results: list[Optional[StreamChunk]] = [None] * len(conversations)
        todo, ids = [], []
        for i, conv in enumerate(conversations):
            try:
                fitted = fit_conversation(conv, tok, ctx, self.params.max_new_tokens)
            except PromptTooLongError as e:
                print(f"warning: {e}", file=sys.stderr)
                results[i] = StreamChunk("", "", 0, 0, FINISH_TOO_LONG)
                if on_row_done:
                    on_row_done(i)
                continue
            todo.append(i)
            ids.append(fitted.input_ids)
        done = None if on_row_done is None else (lambda b, _chunk: on_row_done(todo[b]))
        for i, chunk in zip(todo, generate_batch(self.loaded.model, tok, ids, self.params, context_len=ctx,
                                                 generator=self.generator, on_row_done=done)):
            results[i] = chunk
        return results  # type: ignore[return-value]

    def run_single_turn(self, rows: list[Any], writer: ResumableWriter, prompt_of: Callable[[Any], str],
                        output_of: Callable[[Any, StreamChunk], Any], desc: str) -> int:
        """Answer rows[writer.done:] one instruction each, writing output_of(row, chunk) in order."""
        bar = progress(len(rows), writer.done, desc, self.show_progress)
        with bar, writer:
            for _, window in windows(rows, self.batch_size, writer.done):
                convs = [self.conversation([prompt_of(row)]) for row in window]
                for row, chunk in zip(window, self.reply(convs, on_row_done=lambda _i: bar.update(1))):
                    writer.write(output_of(row, chunk))
        return writer.done
