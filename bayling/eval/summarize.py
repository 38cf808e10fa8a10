"""`summarize`: win/tie/loss per category and overall from `judge` outputs, as a table and a bar chart.

A question's two reviews (one per order) are added up: the system whose two scores sum higher
wins it. If either review is UNPARSEABLE the question is counted as unparseable, not guessed.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

from .io import read_jsonl
from .judge import LOSS, TIE, UNPARSEABLE, WIN

OUTCOMES = (WIN, TIE, LOSS, UNPARSEABLE)
OVERALL = "overall"
CHART_COLORS = {WIN: "#4c9a2a", TIE: "#b0b0b0", LOSS: "#c0392b", UNPARSEABLE: "#f2d7a6"}


def question_outcome(reviews: Sequence[dict], system: str) -> str:
    """WIN/TIE/LOSS for `system` over all reviews of one question, or UNPARSEABLE."""
    mine = theirs = 0.0
    for r in reviews:
        if r.get("result") == UNPARSEABLE or not r.get("score"):
            return UNPARSEABLE
        first_is_me = r["system1"]["name"] == system
        if not first_is_me and r["system2"]["name"] != system:
            raise ValueError(f"question {r.get('question_id')}: {system!r} is neither system in its review")
        s1, s2 = r["score"]
        mine += s1 if first_is_me else s2
        theirs += s2 if first_is_me else s1
    return WIN if mine > theirs else LOSS if mine < theirs else TIE


def summarize(paths: Sequence[Path], system: Optional[str] = None) -> tuple[str, str, dict[str, dict[str, int]]]:
    """(system, opponent, {category: {WIN, TIE, LOSS, UNPARSEABLE counts}}) with an 'overall' entry last."""
    questions: "OrderedDict[tuple[str, Any], list[dict]]" = OrderedDict()
    for path in paths:
        for n, row in enumerate(read_jsonl(path), 1):
            if not isinstance(row, dict) or "system1" not in row or "result" not in row:
                raise ValueError(f"{path}:{n}: not a review row (the output of `judge`)")
            questions.setdefault((str(path), row["question_id"]), []).append(row)
    if not questions:
        raise ValueError("no reviews to summarize")
    first = next(iter(questions.values()))[0]
    system = system or first["system1"]["name"]
    names = {first["system1"]["name"], first["system2"]["name"]}
    if system not in names:
        raise ValueError(f"--system {system!r} is not one of the judged systems: {', '.join(sorted(names))}")
    opponent = (names - {system}).pop() if len(names) > 1 else system
    table: dict[str, dict[str, int]] = {}
    for reviews in questions.values():
        outcome = question_outcome(reviews, system)
        for category in (reviews[0].get("category") or "uncategorized", OVERALL):
            table.setdefault(category, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
    table[OVERALL] = table.pop(OVERALL)  # last
    return system, opponent, table


def format_table(system: str, opponent: str, table: dict[str, dict[str, int]]) -> str:
    width = max(len("category"), *(len(c) for c in table))
    lines = [f"{system} vs {opponent} (each question judged in both orders)",
             f"{'category':<{width}}  {'win':>4}  {'tie':>4}  {'loss':>4}  {'unparseable':>11}  {'win rate':>8}"]
    for category, c in table.items():
        judged = c[WIN] + c[TIE] + c[LOSS]
        rate = f"{100.0 * c[WIN] / judged:7.1f}%" if judged else "       -"
        if category == OVERALL:
            lines.append("-" * len(lines[-1]))
        lines.append(f"{category:<{width}}  {c[WIN]:>4}  {c[TIE]:>4}  {c[LOSS]:>4}  {c[UNPARSEABLE]:>11}  {rate}")
    return "\n".join(lines)


def plot_chart(system: str, opponent: str, table: dict[str, dict[str, int]], path: Path) -> None:
    """A horizontal stacked bar per category: shares of win, tie, loss and unparseable questions."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    categories = list(table)[::-1]  # overall at the top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(categories) + 1.4))
    left = [0.0] * len(categories)
    for outcome in OUTCOMES:
        shares = [100.0 * table[c][outcome] / max(1, sum(table[c].values())) for c in categories]
        ax.barh(categories, shares, left=left, color=CHART_COLORS[outcome], label=outcome.lower())
        for i, (start, share) in enumerate(zip(left, shares)):
            if share >= 8:
                ax.text(start + share / 2, i, f"{share:.0f}%", ha="center", va="center", fontsize=8)
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of questions")
    ax.set_title(f"{system} vs {opponent}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=len(OUTCOMES), frameon=False, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
