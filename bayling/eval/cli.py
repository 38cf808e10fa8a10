"""`python -m bayling.eval SUBCOMMAND`: flags, and one call into the module that does the work."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..loading import ModelLoadError
from .engine import add_eval_model_args
from .judge import JudgeError

Handler = Callable[[argparse.Namespace], int]


def _engine(ns: argparse.Namespace):
    from .engine import EvalModel

    if ns.model_name and ("/" in ns.model_name or ns.model_name.startswith(".")):
        raise ValueError(f"--model-name is used in file names; {ns.model_name!r} may not contain '/'")
    return EvalModel.from_args(ns)


def cmd_fetch_data(ns: argparse.Namespace) -> int:
    from .data import fetch_data

    failures = fetch_data(Path(ns.dest) if ns.dest else None, ns.base_url, ns.force)
    return 1 if failures else 0


def cmd_answer(ns: argparse.Namespace) -> int:
    from .answer import answer_rows
    from .data import load_questions

    data_dir = Path(ns.data_dir) if ns.data_dir else None
    rows = load_questions(ns.questions, ns.allow_modified, data_dir)  # checked before the model loads
    if ns.limit is not None:
        if ns.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {ns.limit}")
        rows = rows[:ns.limit]
    done = answer_rows(_engine(ns), rows, Path(ns.output))
    print(f"{done} rows in {ns.output}")
    return 0


def cmd_translate(ns: argparse.Namespace) -> int:
    from .translate import check_instruction_lang, run_translate

    check_instruction_lang(ns.instruction_lang)
    done = run_translate(_engine(ns), Path(ns.src), Path(ns.output), ns.tgt_lang, ns.instruction_lang)
    print(f"{done} lines in {ns.output}")
    return 0


def cmd_constrained(ns: argparse.Namespace) -> int:
    from .translate import check_instruction_lang, load_constrained, run_constrained

    check_instruction_lang(ns.instruction_lang)
    load_constrained(Path(ns.input))
    done = run_constrained(_engine(ns), Path(ns.input), Path(ns.output), ns.tgt_lang, ns.instruction_lang)
    print(f"{done} rows in {ns.output}")
    return 0


def _emit(text: str, result: dict, as_json: bool) -> None:
    print(text)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))


def cmd_score_translation(ns: argparse.Namespace) -> int:
    from .mt_scores import format_translation, score_translation

    result = score_translation(Path(ns.hyp), Path(ns.ref), ns.tgt_lang, Path(ns.src) if ns.src else None,
                               ns.comet_model, ns.tokenize)
    _emit(format_translation(result), result, ns.json)
    return 0


def cmd_score_constrained(ns: argparse.Namespace) -> int:
    from .mt_scores import format_translation, score_constrained

    result = score_constrained(Path(ns.hyp), ns.tgt_lang, ns.tokenize)
    _emit(format_translation(result), result, ns.json)
    return 0


def cmd_exam(ns: argparse.Namespace) -> int:
    from .exam import find_tasks, run_exam

    tasks = [t for t in ns.tasks.split(",") if t] if ns.tasks else None
    find_tasks(Path(ns.task_dir), tasks)  # checked before the model loads
    for task, path in run_exam(_engine(ns), Path(ns.task_dir), Path(ns.output_dir), tasks, ns.limit).items():
        print(f"{task}: {path}")
    return 0


def cmd_score_exam(ns: argparse.Namespace) -> int:
    from .exam_score import format_scores, score_exam, scores_json

    print(f"scoring rule: {ns.rule}" + (" (AGIEval's post_process, as the BayLing paper)" if ns.rule == "agieval"
                                          else " (this project's stricter reading; not the paper's numbers)"))
    scores = score_exam(Path(ns.pred_dir), Path(ns.gold_dir), ns.model, ns.rule)
    if not scores:
        raise ValueError(f"no task in {ns.pred_dir} could be scored against {ns.gold_dir}")
    _emit(format_scores(scores), scores_json(scores), ns.json)
    return 0


def cmd_judge(ns: argparse.Namespace) -> int:
    from .judge import JudgeClient, api_key_from_env, run_judge

    file_a, file_b = (Path(p) for p in ns.answers)
    names = ns.names or [file_a.stem, file_b.stem]
    if names[0] == names[1]:
        raise ValueError(f"both systems are called {names[0]!r}; give them different --names")
    client = JudgeClient(ns.judge_base_url, ns.judge_model, api_key_from_env(ns.judge_api_key_env),
                         ns.judge_temperature, ns.judge_max_tokens, retries=ns.judge_retries)
    try:
        counts = run_judge(client, file_a, file_b, Path(ns.output), names, ns.concurrency, not ns.no_progress)
    finally:
        client.close()
    print(f"reviews in {ns.output}: " + ", ".join(f"{k.lower()} {v}" for k, v in counts.items()))
    return 0


def cmd_summarize(ns: argparse.Namespace) -> int:
    from .summarize import format_table, plot_chart, summarize

    system, opponent, table = summarize([Path(p) for p in ns.reviews], ns.system)
    if ns.chart:
        plot_chart(system, opponent, table, Path(ns.chart))
    _emit(format_table(system, opponent, table) + (f"\nchart: {ns.chart}" if ns.chart else ""),
          {"system": system, "opponent": opponent, "categories": table}, ns.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bayling.eval",
                                     description="BayLing's evaluation suites: generate, score, judge.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, handler: Handler, help_text: str, model: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if model:
            add_eval_model_args(p)
        p.set_defaults(handler=handler)
        return p

    p = add("fetch-data", cmd_fetch_data, "download BayLing-80 from upstream and verify size and sha256")
    p.add_argument("--dest", default=None,
                   help="where to put the files (default: $BAYLING_DATA_DIR or ~/.local/share/bayling/BayLing-80)")
    p.add_argument("--base-url", default=None, help="another source folder/URL holding the four files")
    p.add_argument("--force", action="store_true", help="download again even if a file is present")

    p = add("answer", cmd_answer, "answer BayLing-80 (or a file in its format), turn by turn", model=True)
    p.add_argument("--questions", required=True,
                   help="a .jsonl file, or singleturn.en / singleturn.zh / multiturn.en / multiturn.zh")
    p.add_argument("--output", required=True, help="answers .jsonl (resumed if it exists)")
    p.add_argument("--allow-modified", action="store_true", help="accept an upstream file whose checksum differs")
    p.add_argument("--data-dir", default=None,
                   help="where short names resolve (default: as fetch-data --dest)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")

    for name, handler, help_text, src_flag in (
            ("translate", cmd_translate, "translate a plain-text file, one hypothesis line per segment", "--src"),
            ("constrained", cmd_constrained, "constrained translation of {src, tgt, constraint} rows", "--input")):
        p = add(name, handler, help_text, model=True)
        p.add_argument(src_flag, required=True, dest=src_flag[2:], help="source file")
        p.add_argument("--output", required=True, help="output file (resumed if it exists)")
        p.add_argument("--tgt-lang", required=True, help="target language code, e.g. zh, en, de")
        p.add_argument("--instruction-lang", default="en", choices=("en", "zh"), help="language of the instruction")

    p = add("score-translation", cmd_score_translation, "BLEU and chrF (as sacrebleu's CLI), COMET if available")
    p.add_argument("--hyp", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--tgt-lang", required=True, help="picks BLEU's tokenizer: zh, ja-mecab for ja, else 13a")
    p.add_argument("--src", default=None, help="source segments (needed by COMET)")
    p.add_argument("--comet-model", default=None, help="COMET model name or checkpoint path")
    p.add_argument("--tokenize", default=None, help="override BLEU's tokenizer")
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")

    p = add("score-constrained", cmd_score_constrained, "BLEU, chrF and constraint-word rate of `constrained` output")
    p.add_argument("--hyp", required=True, help="the .jsonl written by `constrained`")
    p.add_argument("--tgt-lang", required=True)
    p.add_argument("--tokenize", default=None)
    p.add_argument("--json", action="store_true")

    p = add("exam", cmd_exam, "zero-shot predictions for AGIEval v1 task files", model=True)
    p.add_argument("--task-dir", required=True, help="folder of <task>.jsonl files (AGIEval data/v1)")
    p.add_argument("--output-dir", required=True, help="predict.<MODEL>.<task>.zero-shot.jsonl go here")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task file found)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each task")

    p = add("score-exam", cmd_score_exam, "accuracy per AGIEval task")
    p.add_argument("--pred-dir", required=True)
    p.add_argument("--gold-dir", required=True,
                   help="AGIEval data/v1 task files; the paper used them as of June 2023 (see docs/eval.md)")
    p.add_argument("--rule", default="agieval", choices=("agieval", "strict"),
                   help="answer extraction: AGIEval's (reproduces published numbers) or the project's stricter one")
    p.add_argument("--model", default=None, help="which model's predictions, if the folder holds several")
    p.add_argument("--json", action="store_true", help="last line: {task: accuracy_percent}")

    p = add("judge", cmd_judge, "pairwise review of two answer files by an OpenAI-compatible judge")
    p.add_argument("--answers", nargs=2, required=True, metavar=("A", "B"), help="two outputs of `answer`")
    p.add_argument("--names", nargs=2, default=None, metavar=("NAME_A", "NAME_B"),
                   help="system names (default: the file names)")
    p.add_argument("--output", required=True, help="reviews .jsonl (resumed if it exists)")
    p.add_argument("--judge-base-url", required=True, help="e.g. https://api.openai.com/v1")
    p.add_argument("--judge-model", required=True, help="e.g. gpt-4")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge-temperature", type=float, default=0.0)
    p.add_argument("--judge-max-tokens", type=int, default=512)
    p.add_argument("--judge-retries", type=int, default=3, help="retries of a failed request (with backoff)")
    p.add_argument("--concurrency", type=int, default=1, help="reviews requested at once")
    p.add_argument("--no-progress", action="store_true")

    p = add("summarize", cmd_summarize, "win/tie/loss per category and overall, and a bar chart")
    p.add_argument("--reviews", nargs="+", required=True, help="outputs of `judge`")
    p.add_argument("--system", default=None, help="whose wins to count (default: the first system)")
    p.add_argument("--chart", default=None, help="write a PNG bar chart here")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, run one subcommand; user errors are one 'error: ...' line and exit status 2."""
    ns = build_parser().parse_args(argv)
    try:
        return ns.handler(ns)
    except (ValueError, FileNotFoundError, ModelLoadError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


def run() -> None:
    """The console command `bayling-eval`."""
    sys.exit(main())
