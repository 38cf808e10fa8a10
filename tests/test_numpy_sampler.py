"""The numpy sampler (llama.cpp path) against the torch sampler (the reference): same rules, same numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bayling.engine import numpy_sampler, torch_sampler
from bayling.engine.numpy_sampler import NumpySampler
from bayling.engine.sampler import LOGPROB_FLOOR, plan_step
from bayling.engine.torch_sampler import TorchSampler
from bayling.params import GenerationParams

V = 3000
PROMPT = [5, 17, 17, 900, 2999]
ANSWER = [17, 42, 42, 42, 7]


def random_logits(b: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, V)) * 3).astype(np.float32)


def rows_for(sampler, params: list[GenerationParams], answer=ANSWER):
    """Rows as the engine makes them, with the answer so far recorded (after the first step's prepare)."""
    rows = [sampler.new_row(p, PROMPT, p.seed) for p in params]
    for r in rows:
        r.prepare(V) if isinstance(sampler, NumpySampler) else r.prepare(V, torch.device("cpu"))
        for t in answer:
            r.record(t)
    return rows


PENALIZED = [
    GenerationParams(temperature=0, repetition_penalty=1.3),
    GenerationParams(temperature=0, presence_penalty=0.7, frequency_penalty=-0.4),
    GenerationParams(temperature=0, logit_bias={"42": 5.5, "7": -100, "99999": 3}),
    GenerationParams(temperature=0, repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=2.0,
                     logit_bias={"17": 1.0}),
    GenerationParams(temperature=0),
]


def test_penalties_equal():
    logits = random_logits(len(PENALIZED))
    want = torch.from_numpy(logits.copy())
    torch_sampler._penalize(want, rows_for(TorchSampler(), PENALIZED))
    for i, r in enumerate(rows_for(NumpySampler(), PENALIZED)):
        got = logits[i].copy()
        numpy_sampler._penalize(got, r)
        np.testing.assert_array_equal(got, want[i].numpy())
    assert not np.array_equal(want[0].numpy(), logits[0])  # the penalties did something


def test_greedy_choices_and_logprobs_equal():
    params = [GenerationParams(**{**p.__dict__, "logprobs": n}) for p, n in zip(PENALIZED, (0, 3, 5, 20, None))]
    for seed in range(5):
        logits = random_logits(len(params), seed)
        want = TorchSampler().sample(torch.from_numpy(logits.copy()), rows_for(TorchSampler(), params))
        got = NumpySampler().sample(logits, rows_for(NumpySampler(), params))
        assert [t for t, _ in got] == [t for t, _ in want]
        for (_, g), (_, w) in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
                assert [t for t, _ in g.top] == [t for t, _ in w.top]
                np.testing.assert_allclose([v for _, v in g.top], [v for _, v in w.top], atol=1e-5)


def test_plain_greedy_does_not_copy_or_write():
    logits = random_logits(3)
    logits.flags.writeable = False  # as llama.cpp's buffer is handed over
    rows = rows_for(NumpySampler(), [GenerationParams(temperature=0)] * 3, answer=[])
    assert [t for t, _ in NumpySampler().sample(logits, rows)] == logits.argmax(1).tolist()
    rows = rows_for(NumpySampler(), PENALIZED)  # penalties work on a copy
    NumpySampler().sample(random_logits(len(PENALIZED)).copy(), rows)
    NumpySampler().sample(np.repeat(logits[:1], len(PENALIZED), 0), rows)


TRUNCATING = [
    GenerationParams(temperature=0.7, top_k=1),
    GenerationParams(temperature=0.7, top_k=50),
    GenerationParams(temperature=1.3, top_p=0.9),
    GenerationParams(temperature=0.5, top_p=0.3),
    GenerationParams(temperature=2.0, top_p=0.999),  # needs more than the first guess of candidates
    GenerationParams(temperature=1.0, top_k=200, top_p=0.5),
    GenerationParams(temperature=1.0, top_k=10, top_p=0.99),
    GenerationParams(temperature=1.0),
]


def test_top_k_top_p_masks_equal():
    for seed in range(5):
        logits = random_logits(len(TRUNCATING), seed)
        rows = rows_for(NumpySampler(), TRUNCATING, answer=[])
        plan = plan_step(rows, V)
        scaled = torch.from_numpy(logits) / torch.tensor(plan.temperatures)[:, None]
        want = torch_sampler._truncate(scaled, plan).numpy()
        for j in range(len(TRUNCATING)):
            got, keep = numpy_sampler._truncate(logits[j] / np.float32(plan.temperatures[j]), plan, j)
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want[j]), err_msg=str(TRUNCATING[j]))
            np.testing.assert_allclose(got[np.isfinite(got)], want[j][np.isfinite(want[j])], rtol=1e-6)
            if keep is not None:
                assert keep.tolist() == np.flatnonzero(np.isfinite(want[j])).tolist()
        assert np.isfinite(want[0]).sum() == 1 and np.isfinite(want[1]).sum() == 50


def test_drawn_logprobs_come_from_the_sampled_distribution():
    params = [GenerationParams(**{**p.__dict__, "logprobs": 20}) for p in TRUNCATING]
    logits = random_logits(len(params), 3)
    want = TorchSampler().sample(torch.from_numpy(logits.copy()), rows_for(TorchSampler(), params, answer=[]))
    got = NumpySampler(seed=1).sample(logits, rows_for(NumpySampler(), params, answer=[]))
    for (gt, g), (_, w), p in zip(got, want, params):
        # removed tokens tie at the floor, in any order
        assert [t for t, v in g.top if v > LOGPROB_FLOOR] == [t for t, v in w.top if v > LOGPROB_FLOOR]
        np.testing.assert_allclose([v for _, v in g.top], [v for _, v in w.top], atol=1e-5)
        top = dict(w.top)
        if gt in top:  # the chosen token's logprob is the same distribution's
            assert g.logprob == pytest.approx(top[gt], abs=1e-5)
        assert g.logprob > LOGPROB_FLOOR  # never a removed token
    assert got[0][1].top[1][1] == LOGPROB_FLOOR  # top_k=1: the second best was removed


def test_samples_follow_the_distribution():
    """Many unseeded rows of the same logits: the pick frequencies are the truncated softmax."""
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], dtype=np.float32)
    p = GenerationParams(temperature=0.8, top_k=4, top_p=0.95)
    n = 20000
    sampler = NumpySampler(seed=0)
    rows = [sampler.new_row(p, [], None) for _ in range(n)]
    got = np.bincount([t for t, _ in sampler.sample(np.repeat(logits, n, 0), rows)], minlength=6) / n
    scaled = torch_sampler._truncate(torch.from_numpy(logits) / 0.8, plan_step(rows[:1], 6))
    want = scaled.softmax(-1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=0.015)
    assert got[4] == got[5] == 0


def test_seeded_rows_reproduce_alone_and_in_a_batch_of_8():
    steps = 20
    logits = [random_logits(8, 100 + s) for s in range(steps)]
    seeded = GenerationParams(temperature=1.0, top_p=0.95, seed=1234, repetition_penalty=1.1)

    def run(params: list[GenerationParams], row: int) -> list[int]:
        sampler = NumpySampler()
        rows = [sampler.new_row(p, PROMPT, p.seed) for p in params]
        out = []
        for s in range(steps):
            picked = sampler.sample(logits[s][:len(params)] if len(params) > 1 else logits[s][row:row + 1], rows)
            for r, (t, _) in zip(rows, picked):
                r.record(t)
            out.append(picked[row if len(params) > 1 else 0][0])
        return out

    alone = run([seeded], 5)
    others = [GenerationParams(temperature=1.0), GenerationParams(temperature=0), GenerationParams(temperature=0.9, seed=7),
              GenerationParams(temperature=1.2, top_k=5), seeded, GenerationParams(temperature=0.5, top_p=0.5),
              GenerationParams(temperature=1.0, presence_penalty=1.0)]
    assert run(others[:5] + [seeded] + others[5:], 5) == alone
    assert run([GenerationParams(temperature=1.0, seed=99)] * 3 + others[:2] + [seeded] + others[2:4], 5) == alone
    assert run([GenerationParams(temperature=1.0, top_p=0.95, seed=1235, repetition_penalty=1.1)], 5) != alone
    # a forked row (answer i of n) uses its own seed and its parent's penalty state
    sampler = NumpySampler()
    parent = sampler.new_row(seeded, PROMPT, 1234)
    sampler.sample(logits[0][:1], [parent])
    child = parent.fork(1235)
    assert child.seed == 1235 and child.seen is not parent.seen and np.array_equal(child.seen, parent.seen)
