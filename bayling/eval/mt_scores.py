"""`score-translation` and `score-constrained`: BLEU and chrF as sacrebleu's CLI computes them, COMET if present."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from .io import read_jsonl

COMET_HINT = ("COMET not computed: {reason}. To add it: pip install unbabel-comet, and pass --comet-model "
              "with a model name or a local checkpoint (e.g. Unbabel/wmt22-comet-da) plus --src")


def read_segments(path: Path) -> list[str]:
    """Lines exactly as sacrebleu's CLI reads them (trailing whitespace stripped)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip() for line in f]


def bleu_chrf(hyps: Sequence[str], refs: Sequence[str], tgt_lang: str,
              tokenize: Optional[str] = None) -> dict[str, Any]:
    """Corpus BLEU (tokenizer chosen from the target language, as `sacrebleu -l xx-TGT`) and chrF."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references; they must pair line by line")
    try:
        bleu = BLEU(trg_lang=tgt_lang, tokenize=tokenize)
    except RuntimeError as e:  # e.g. ja-mecab without its extra packages
        raise ValueError(f"BLEU tokenizer for {tgt_lang!r}: {str(e).strip().splitlines()[0]} "
                         f"(pip install 'sacrebleu[{tgt_lang}]', or pass --tokenize)") from None
    chrf = CHRF()
    b, c = bleu.corpus_score(list(hyps), [list(refs)]), chrf.corpus_score(list(hyps), [list(refs)])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "segments": len(hyps)}


def comet_score(srcs: Optional[Sequence[str]], hyps: Sequence[str], refs: Sequence[str],
                model: Optional[str], batch_size: int = 8) -> tuple[Optional[float], str]:
    """(system COMET score, "") when unbabel-comet and a model are available, else (None, note)."""
    if not model:
        return None, COMET_HINT.format(reason="no --comet-model given")
    if srcs is None:
        return None, COMET_HINT.format(reason="COMET needs the source segments (--src)")
    try:
        from comet import download_model, load_from_checkpoint
    except ImportError:
        return None, COMET_HINT.format(reason="the unbabel-comet package is not installed")
    try:
        path = model if Path(model).exists() else download_model(model)
        scorer = load_from_checkpoint(path)
        data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(srcs, hyps, refs)]
        out = scorer.predict(data, batch_size=batch_size, gpus=0, progress_bar=False)
        return float(out.system_score) * 100, ""
    except Exception as e:  # model not downloadable offline, bad checkpoint...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, COMET_HINT.format(reason=f"{model} could not be loaded ({reason[:160]})")


def score_translation(hyp: Path, ref: Path, tgt_lang: str, src: Optional[Path] = None,
                      comet_model: Optional[str] = None, tokenize: Optional[str] = None) -> dict[str, Any]:
    hyps, refs = read_segments(hyp), read_segments(ref)
    result = bleu_chrf(hyps, refs, tgt_lang, tokenize)
    srcs = read_segments(src) if src else None
    if srcs is not None and len(srcs) != len(hyps):
        raise ValueError(f"{len(srcs)} source segments but {len(hyps)} hypotheses")
    result["comet"], note = comet_score(srcs, hyps, refs, comet_model)
    if note:
        result["comet_note"] = note
    return result


def constraint_hits(hypo: str, constraints: Sequence[str]) -> int:
    """How many constraint words appear verbatim (case-sensitive substring) in the hypothesis."""
    return sum(1 for c in constraints if c in hypo)


def score_constrained(path: Path, tgt_lang: str, tokenize: Optional[str] = None) -> dict[str, Any]:
    """BLEU/chrF of `hypo` against `tgt`, and the share of constraint words present, overall and by count."""
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not all(k in row for k in ("hypo", "tgt", "constraint")):
            raise ValueError(f"{path}:{n}: expected a row with hypo, tgt and constraint (the output of `constrained`)")
    result = bleu_chrf([r["hypo"].rstrip() for r in rows], [r["tgt"].rstrip() for r in rows], tgt_lang, tokenize)
    hits, total = defaultdict(int), defaultdict(int)
    rows_by_n = defaultdict(int)
    for r in rows:
        n = len(r["constraint"])
        rows_by_n[n] += 1
        total[n] += n
        hits[n] += constraint_hits(r["hypo"], r["constraint"])
    all_words = sum(total.values())
    result["constraint_words"] = all_words
    result["constraint_rate"] = 100.0 * sum(hits.values()) / all_words if all_words else None
    result["by_constraint_count"] = {
        str(n): {"rows": rows_by_n[n], "words": total[n], "present": hits[n],
                 "rate": 100.0 * hits[n] / total[n] if total[n] else None}
        for n in sorted(rows_by_n)}
    return result


def format_translation(result: dict[str, Any]) -> str:
    lines = [f"BLEU  {result['bleu']:.2f}   ({result['bleu_signature']})",
             f"chrF  {result['chrf']:.2f}   ({result['chrf_signature']})"]
    if "comet" in result:
        lines.append(f"COMET {result['comet']:.2f}" if result["comet"] is not None else f"note: {result['comet_note']}")
    if result.get("constraint_rate") is not None:
        lines.append(f"constraint words present: {result['constraint_rate']:.2f}% of {result['constraint_words']}")
        lines.append("  #constraints  rows  words  present   rate")
        for n, g in result["by_constraint_count"].items():
            rate = f"{g['rate']:6.2f}%" if g["rate"] is not None else "     -"
            lines.append(f"  {n:>12}  {g['rows']:>4}  {g['words']:>5}  {g['present']:>7}  {rate}")
    return "\n".join(lines)
