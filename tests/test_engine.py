"""The one engine on a tiny random LLaMA, against transformers' own generate and logits."""
import pytest
import torch

from bayling.engine.core import Engine, EngineConfig
from bayling.engine.driver import stream
from bayling.engine.request import BudgetError, OutputKind, Request
from bayling.engine.torch_runner import TorchRunner
from bayling.loading import ModelArgs, load_model
from bayling.params import GenerationParams

PROMPTS = [[1, 5, 17, 42, 99, 7, 300, 12, 8], [1, 44, 45], [1] + list(range(100, 140)), [1, 250, 251, 252, 9]]
GREEDY = GenerationParams(temperature=0, max_new_tokens=16, ignore_eos=True)


def make_engine(lm, max_num_seqs=8, max_num_batched_tokens=64, kv_tokens=4096):
    runner = TorchRunner(lm.model, kv_cache_memory=kv_tokens * TorchRunner(lm.model, kv_cache_memory=1).kv_bytes_per_token())
    return Engine(runner, lm.tokenizer, [], EngineConfig(max_num_seqs, max_num_batched_tokens))


def reference(model, ids, n=16):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def run_all(engine, arrivals):
    """arrivals: {step: [Request]}; returns {request_id: final output} and the step count."""
    finals, step = {}, 0
    while engine.has_unfinished() or any(k >= step for k in arrivals):
        for r in arrivals.get(step, []):
            engine.add_request(r)
        for out in engine.step():
            if out.finished:
                finals[(out.request_id, out.index)] = out
        step += 1
    return finals, step


def final(rid, ids, params=GREEDY):
    return Request(rid, ids, params, OutputKind.FINAL)


@pytest.mark.parametrize("arrive_every", [0, 3])
def test_greedy_batch_matches_generate(tiny_llama, arrive_every):
    engine = make_engine(tiny_llama, max_num_batched_tokens=16)  # small: the long prompt is chunked
    arrivals = {}
    for i, ids in enumerate(PROMPTS):
        arrivals.setdefault(i * arrive_every, []).append(final(str(i), ids))
    finals, _ = run_all(engine, arrivals)
    for i, ids in enumerate(PROMPTS):
        assert list(finals[(str(i), 0)].token_ids) == reference(tiny_llama.model, ids)
    assert engine.stats.shared_steps > 0 and engine.kv_tokens_in_use() == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_greedy_matches_generate(tiny_llama_dir, bits):
    lm = load_model(ModelArgs(model_path=str(tiny_llama_dir), device="cpu", load_8bit=bits == 8,
                              load_4bit=bits == 4))
    engine = make_engine(lm)
    finals, _ = run_all(engine, {0: [final(str(i), ids) for i, ids in enumerate(PROMPTS[:2])]})
    for i, ids in enumerate(PROMPTS[:2]):
        assert list(finals[(str(i), 0)].token_ids) == reference(lm.model, ids)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_llama):
    params = GenerationParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, ignore_eos=True,
                              seed=1234, repetition_penalty=1.1, presence_penalty=0.5)
    alone, _ = run_all(make_engine(tiny_llama), {0: [final("x", PROMPTS[0], params)]})
    others = [final(f"o{i}", PROMPTS[i % 4], GenerationParams(temperature=0.8, max_new_tokens=8 + i, seed=i,
                                                               ignore_eos=True)) for i in range(7)]
    batch, _ = run_all(make_engine(tiny_llama), {0: others[:3] + [final("x", PROMPTS[0], params)] + others[3:]})
    assert alone[("x", 0)].token_ids == batch[("x", 0)].token_ids
    other_seed, _ = run_all(make_engine(tiny_llama),
                            {0: [final("x", PROMPTS[0], GenerationParams(**{**params.__dict__, "seed": 99}))]})
    assert other_seed[("x", 0)].token_ids != alone[("x", 0)].token_ids  # the seed really steers sampling


def test_logprobs_are_log_softmax_of_transformers_logits(tiny_llama):
    params = GenerationParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=5)
    finals, _ = run_all(make_engine(tiny_llama), {0: [final("a", PROMPTS[0], params), final("b", PROMPTS[1])]})
    out = finals[("a", 0)]
    ids = PROMPTS[0] + list(out.token_ids)
    with torch.no_grad():
        logp = tiny_llama.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for k, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logp[len(PROMPTS[0]) - 1 + k]
        assert lp.token_id == token and lp.logprob == pytest.approx(float(row[token]), abs=1e-4)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()
    assert finals[("b", 0)].logprobs is None


def test_n_answers_share_one_prefill(tiny_llama):
    params = GenerationParams(temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=7, n=3)
    engine = make_engine(tiny_llama)
    finals, _ = run_all(engine, {0: [final("n", PROMPTS[2], params)]})
    answers = [finals[("n", i)].token_ids for i in range(3)]
    assert len(set(answers)) == 3 and engine.stats.prefills == 1
    alone, _ = run_all(make_engine(tiny_llama), {0: [final("s", PROMPTS[2], GenerationParams(
        **{**params.__dict__, "n": 1, "seed": 8}))]})
    assert alone[("s", 0)].token_ids == answers[1]  # answer i uses seed + i


def test_memory_budget_queues_and_never_overflows(tiny_llama):
    engine = make_engine(tiny_llama, kv_tokens=300)
    params = GenerationParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    requests = [final(str(i), PROMPTS[i % 4], params) for i in range(8)]
    peak = 0
    for r in requests:
        engine.add_request(r)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            finals[out.request_id] = out
        peak = max(peak, engine.kv_tokens_in_use())
        assert engine.kv_tokens_in_use() <= 300
    assert len(finals) == 8 and all(o.finish_reason == "length" for o in finals.values())
    assert 0 < peak <= 300 and engine.stats.peak_batch < 8  # some had to wait
    for i in range(8):
        assert list(finals[str(i)].token_ids) == reference(tiny_llama.model, PROMPTS[i % 4], 40)
    with pytest.raises(BudgetError, match=r"needs 482 KV cache tokens .* budget holds 300"):
        engine.add_request(final("big", [1] * 41, GenerationParams(temperature=0, max_new_tokens=200, n=2)))


def test_a_failing_step_fails_only_its_requests(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=1)
    real_run, calls = engine.runner.run, []

    def flaky(chunks):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_run(chunks)

    engine.runner.run = flaky
    for i in range(3):
        engine.add_request(final(str(i), PROMPTS[i], GenerationParams(temperature=0, max_new_tokens=5,
                                                                      ignore_eos=True)))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs["0"].finish_reason == "error" and "out of memory" in str(outs["0"].error)
    assert outs["1"].finish_reason == outs["2"].finish_reason == "length"
    assert list(outs["2"].token_ids) == reference(tiny_llama.model, PROMPTS[2], 5)
    assert engine.stats.errors == 1 and engine.kv_tokens_in_use() == 0


def test_chunked_prefill_keeps_running_streams_fed(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=4, max_num_batched_tokens=8)
    # logprobs=0: an output at every token, even while text is held back (a partial character)
    engine.add_request(Request("run", PROMPTS[1], GenerationParams(temperature=0, max_new_tokens=60,
                                                                   ignore_eos=True, logprobs=0), OutputKind.DELTA))
    for _ in range(3):
        engine.step()
    engine.add_request(final("long", [1] + list(range(10, 150)), GenerationParams(temperature=0, max_new_tokens=2)))
    gaps, since, long_done = [], 0, False
    while not long_done:
        outs = engine.step()
        since += 1
        if any(o.request_id == "run" for o in outs):
            gaps.append(since)
            since = 0
        long_done = any(o.request_id == "long" and o.finished for o in outs)
    assert engine.stats.prefill_chunks >= 140 // 8  # the long prompt really went in chunks
    assert len(gaps) >= 15 and max(gaps) == 1  # the running stream got a token at every step


def test_stream_driver_close_aborts(tiny_llama):
    engine = make_engine(tiny_llama)
    it = stream(engine, Request("c", PROMPTS[0], GenerationParams(temperature=0, max_new_tokens=100,
                                                                   ignore_eos=True)))
    next(it)
    it.close()
    assert not engine.has_unfinished() and engine.stats.aborted == 1 and engine.kv_tokens_in_use() == 0
    ids = [t for o in stream(engine, Request("d", PROMPTS[0], GREEDY)) for t in o.token_ids]
    assert ids == reference(tiny_llama.model, PROMPTS[0])


def test_eval_seed_gives_identical_files_at_any_batch_size(tiny_llama, tmp_path):
    from bayling.eval.answer import answer_rows
    from bayling.eval.data import load_questions
    from bayling.eval.engine import EvalModel
    from eval_helpers import ROOT

    rows = load_questions(str(ROOT / "data" / "samples" / "questions.multiturn.en.jsonl"))
    rows = rows + [{**r, "question_id": f"{r['question_id']}-b"} for r in rows] * 1
    params = GenerationParams(temperature=1.0, max_new_tokens=12)
    texts = []
    for batch in (1, 8):
        model = EvalModel.from_loaded(tiny_llama, params, batch_size=batch, show_progress=False, seed=5)
        out = tmp_path / f"b{batch}.jsonl"
        assert answer_rows(model, rows, out) == len(rows)
        texts.append(out.read_text(encoding="utf-8"))
    assert texts[0] == texts[1]
    # resuming after the first row gives the same file too
    first = texts[0].splitlines(keepends=True)[0]
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(first, encoding="utf-8")
    answer_rows(EvalModel.from_loaded(tiny_llama, params, batch_size=3, show_progress=False, seed=5), rows, resumed)
    assert resumed.read_text(encoding="utf-8") == texts[0]
    other = EvalModel.from_loaded(tiny_llama, params, batch_size=8, show_progress=False, seed=6)
    answer_rows(other, rows, tmp_path / "other.jsonl")
    assert (tmp_path / "other.jsonl").read_text(encoding="utf-8") != texts[0]
