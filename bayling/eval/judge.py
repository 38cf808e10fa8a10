"""`judge`: pairwise review of two answer files by a judge model behind an OpenAI-compatible API.

Every question is judged twice, once with each system as Assistant 1, so that the judge's
position bias cancels out when `summarize` adds the two reviews up. A review whose two scores
cannot be read is written as it is, with result UNPARSEABLE; it is never guessed.
"""
from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .io import ResumableWriter, progress, read_jsonl

# The reviewer prompt of upstream BayLing's GPT-4 evaluation (after FairEval / FastChat's reviewer).
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = ("[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n"
                  "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n"
                  "[The End of Assistant 2's Answer]\n\n[System]\n{prompt}\n")
JUDGE_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses.\n\nEach assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first provide a comprehensive explanation of your evaluation, avoiding "
    "any potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment.\nThen, output two lines indicating the scores for Assistant 1 and 2, respectively.\n\n"
    "Output with the following format:\nEvaluation evidence: <your evaluation explanation here>\n"
    "Score of the Assistant 1: <score>\nScore of the Assistant 2: <score>")
WIN, TIE, LOSS, UNPARSEABLE = "WIN", "TIE", "LOSS", "UNPARSEABLE"
FORWARD, REVERSE = "AB", "BA"  # which system is Assistant 1
MIN_SCORE, MAX_SCORE = 0.0, 10.0
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
REQUEST_TIMEOUT_S = 300
RETRIES = 3
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries); the message says how."""


_SCORE = re.compile(r"score\s+of\s+(?:the\s+)?assistant\s*([12])\s*[:：]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_review(review: str) -> Optional[tuple[float, float]]:
    """(score 1, score 2) from 'Score of the Assistant 1: N' / '... 2: M', or None.

    None when a score is missing, outside 0..10, or given twice with different values.
    """
    found: dict[str, set[float]] = {"1": set(), "2": set()}
    for which, value in _SCORE.findall(review or ""):
        found[which].add(float(value))
    if any(len(v) != 1 for v in found.values()):
        return None
    s1, s2 = found["1"].pop(), found["2"].pop()
    if not all(MIN_SCORE <= s <= MAX_SCORE for s in (s1, s2)):
        return None
    return s1, s2


def result_of(score: Optional[tuple[float, float]]) -> str:
    """WIN/TIE/LOSS for Assistant 1, or UNPARSEABLE."""
    if score is None:
        return UNPARSEABLE
    return WIN if score[0] > score[1] else LOSS if score[0] < score[1] else TIE


def _as_text(value: Any) -> str:
    """A question or answer for the prompt: multi-turn lists are shown turn by turn."""
    if isinstance(value, list):
        return "\n\n".join(f"[Turn {i}] {v}" for i, v in enumerate(value, 1)) if len(value) > 1 else str(value[0])
    return str(value)


def judge_messages(question: Any, answer_1: Any, answer_2: Any) -> list[dict]:
    """The chat messages sent to the judge."""
    user = JUDGE_TEMPLATE.format(question=_as_text(question), answer_1=_as_text(answer_1),
                                 answer_2=_as_text(answer_2), prompt=JUDGE_PROMPT)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


class JudgeClient:
    """A minimal OpenAI chat-completions client (httpx), with retries on transient errors."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, temperature: float = 0.0,
                 max_tokens: int = 512, timeout_s: float = REQUEST_TIMEOUT_S, retries: int = RETRIES) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model, self.temperature, self.max_tokens, self.retries = model, temperature, max_tokens, retries

    def complete(self, messages: list[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        for attempt in range(self.retries + 1):
            try:
                response = self._http.post("/chat/completions", json=body)
                if response.status_code in RETRY_STATUS and attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                if response.status_code != 200:
                    raise JudgeError(f"judge endpoint answered HTTP {response.status_code}: {response.text[:300]}")
                return response.json()["choices"][0]["message"]["content"] or ""
            except (httpx.TransportError, ValueError, KeyError) as e:
                if attempt == self.retries:
                    raise JudgeError(f"judge endpoint {self._http.base_url} failed: {e}") from None
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()


@dataclass(frozen=True)
class Pair:
    question_id: Any
    question: Any
    category: Optional[str]
    response_a: Any
    response_b: Any


def load_pairs(file_a: Path, file_b: Path) -> list[Pair]:
    """Questions answered in both files (by question_id), in the order of file_a."""
    rows_a, rows_b = read_jsonl(file_a), read_jsonl(file_b)
    for path, rows in ((file_a, rows_a), (file_b, rows_b)):
        for n, r in enumerate(rows, 1):
            if not isinstance(r, dict) or "question_id" not in r or "response" not in r:
                raise ValueError(f"{path}:{n}: expected an answer row with question_id and response "
                                 "(the output of `answer`)")
    by_id = {r["question_id"]: r for r in rows_b}
    missing = [r["question_id"] for r in rows_a if r["question_id"] not in by_id]
    if missing:
        print(f"warning: {len(missing)} questions of {file_a.name} are not in {file_b.name}, "
              f"e.g. {missing[:3]}; they are not judged", file=sys.stderr)
    return [Pair(r["question_id"], r.get("text"), r.get("category"), r["response"], by_id[r["question_id"]]["response"])
            for r in rows_a if r["question_id"] in by_id]


def review_row(pair: Pair, order: str, names: tuple[str, str], review: str) -> dict:
    """One output row: the two systems as they were presented, the review, its scores and result."""
    a = {"name": names[0], "response": pair.response_a}
    b = {"name": names[1], "response": pair.response_b}
    first, second = (a, b) if order == FORWARD else (b, a)
    score = parse_review(review)
    return {"question_id": pair.question_id, "question": pair.question, "category": pair.category,
            "order": order, "system1": first, "system2": second, "review": review,
            "score": list(score) if score else None, "result": result_of(score)}


def run_judge(client: JudgeClient, file_a: Path, file_b: Path, output: Path, names: Sequence[str],
              concurrency: int = 1, show_progress: bool = True) -> dict[str, int]:
    """Judge every question in both orders; appends to output (resumable); returns result counts."""
    pairs = load_pairs(file_a, file_b)
    jobs = [(p, order) for p in pairs for order in (FORWARD, REVERSE)]
    writer = ResumableWriter(output)
    done_rows = writer.existing()
    for n, (row, (pair, order)) in enumerate(zip(done_rows, jobs), 1):
        if row.get("question_id") != pair.question_id or row.get("order") != order:
            raise ValueError(f"{output}: row {n} is not question {pair.question_id} order {order}; "
                             "it was written for other answer files: choose another --output")

    def ask(job: tuple[Pair, str]) -> str:
        pair, order = job
        one, two = (pair.response_a, pair.response_b) if order == FORWARD else (pair.response_b, pair.response_a)
        return client.complete(judge_messages(pair.question, one, two))

    counts = {WIN: 0, TIE: 0, LOSS: 0, UNPARSEABLE: 0}
    for row in done_rows:
        counts[row.get("result", UNPARSEABLE)] = counts.get(row.get("result", UNPARSEABLE), 0) + 1
    bar = progress(len(jobs), writer.done, f"judge {output.name}", show_progress)
    todo = jobs[writer.done:]
    step = max(1, concurrency)
    with bar, writer, ThreadPoolExecutor(max_workers=step) as pool:
        # A step at a time: an error stops the run after at most `step` wasted requests.
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            for (pair, order), review in zip(chunk, pool.map(ask, chunk)):  # map keeps the order
                row = review_row(pair, order, (names[0], names[1]), review)
                writer.write(row)
                counts[row["result"]] += 1
                bar.update(1)
    return counts


def api_key_from_env(var: str) -> Optional[str]:
    """The judge's API key from an environment variable (never from the command line)."""
    key = os.environ.get(var)
    if not key:
        print(f"note: ${var} is not set; calling the judge endpoint without an API key", file=sys.stderr)
    return key or None
