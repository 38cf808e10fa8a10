"""apply_delta on tiny random LLaMAs: bit-exact against upstream's algorithm, every bad input refused
with its message and nothing left behind, interrupted runs cleaned up."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from delta_helpers import (bits_equal, edit_shard, leftovers, load_folder, load_folder_fp16, reference_merge,
                           reference_model, save_model, tiny_config, to_bin_shards)

from bayling.delta import DeltaError, DeltaJob, run
from bayling.serve.launch import default_sigint
from bayling.delta.formats import read_tensor, torch_bin_tensors

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, how are you? 你好"


@dataclass
class Pair:
    root: Path
    base: Path
    delta: Path
    tokenizer: object


@pytest.fixture(scope="module")
def pair(tmp_path_factory, bpe_tokenizer):
    """A base in fp32 (4+ shards) and a delta in fp16 (other shard boundaries) with the tokenizer."""
    root = tmp_path_factory.mktemp("delta")
    config = tiny_config(len(bpe_tokenizer))
    base = save_model(root / "base", config, seed=0, shard="100KB")
    delta = save_model(root / "delta", config, seed=1, dtype=torch.float16, shard="60KB", tokenizer=bpe_tokenizer)
    return Pair(root, base, delta, bpe_tokenizer)


@pytest.fixture(scope="module")
def merged(pair):
    out = pair.root / "merged"
    result = run(DeltaJob(base=str(pair.base), target=str(out), delta=str(pair.delta), max_shard_size="150KB",
                          verify=True, progress=False))
    assert result.verdict.startswith("verified: all") and "bit for bit" in result.verdict
    return out


def job(pair: Pair, out: Path, **kw) -> DeltaJob:
    values = dict(base=str(pair.base), target=str(out), delta=str(pair.delta), progress=False)
    values.update(kw)
    return DeltaJob(**values)


def test_merge_equals_upstream_bit_for_bit(pair, merged):
    ref = reference_merge(pair.base, pair.delta)
    got = load_folder(merged)
    assert set(got) == set(ref)
    assert all(bits_equal(got[n], ref[n]) for n in ref)
    # Layout: several shards with a true index, the delta's config and tokenizer, a checksum manifest.
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ref.values())
    config = json.loads((merged / "config.json").read_text())
    assert config["hidden_size"] == json.loads((pair.delta / "config.json").read_text())["hidden_size"]
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert (merged / "tokenizer.json").read_bytes() == (pair.delta / "tokenizer.json").read_bytes()
    sums = dict(reversed(line.split("  ")) for line in (merged / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {p.name for p in merged.iterdir()} - {"SHA256SUMS"}
    assert all(hashlib.sha256((merged / n).read_bytes()).hexdigest() == h for n, h in sums.items())
    assert leftovers(merged) == ["merged"]


def test_make_diff_then_merge_round_trips(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("bayling.delta.pieces.CHUNK_BYTES", 6000)  # several pieces per tensor
    config = tiny_config(len(pair.tokenizer))
    target = save_model(tmp_path / "target", config, seed=5, like=pair.base, scale=0.01, tokenizer=pair.tokenizer)
    diff = tmp_path / "diff"
    result = run(DeltaJob(base=str(pair.base), target=str(target), delta=str(diff), make_diff=True,
                          max_shard_size="120KB", verify=True, progress=False))
    assert "equal target - base bit for bit" in result.verdict and "within fp16 rounding" in result.verdict
    ref_diff = reference_merge(target, pair.base, subtract=True)
    got_diff = load_folder(diff)
    assert all(bits_equal(got_diff[n], ref_diff[n]) for n in ref_diff)

    back = tmp_path / "back"
    run(DeltaJob(base=str(pair.base), target=str(back), delta=str(diff), progress=False))
    got, ref = load_folder(back), reference_merge(pair.base, diff)
    want, base16 = load_folder_fp16(target), load_folder_fp16(pair.base)
    exact = total = 0
    for name, t in want.items():
        assert bits_equal(got[name], ref[name])  # exactly what upstream gives, so exact where it is
        g, t32, b32 = got[name].float(), t.float(), base16[name].float()
        # Two fp16 roundings (diff, then sum): |error| <= u * (|t - b| + |result|), u = 2^-11.
        assert bool(((g - t32).abs() <= 2.0 ** -11 * 1.01 * ((t32 - b32).abs() + g.abs()) + 2.0 ** -23).all()), name
        exact += int((got[name].view(torch.int16) == t.view(torch.int16)).sum())
        total += t.numel()
    assert 0.9 < exact / total < 1.0  # most values come back exactly; the rest differ by a rounding


def test_merged_folder_loads_and_chats(pair, merged):
    from bayling.generation import generate
    from bayling.loading import ModelArgs, load_model
    from bayling.params import GenerationParams

    lm = load_model(ModelArgs(model_path=str(merged), device="cpu"))
    params = GenerationParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    got = generate(lm.model, lm.tokenizer, PROMPT, params)
    reference = reference_model(pair.base, pair.delta).float().eval()
    want = generate(reference, lm.tokenizer, PROMPT, params)
    assert got.completion_tokens == 12 and got.text and got.text == want.text


def test_bin_shards_merge_to_the_same_model(pair, merged, tmp_path):
    base_bin = to_bin_shards(pair.base, tmp_path / "base-bin", shards=3)
    delta_bin = tmp_path / "delta-bin"
    shutil.copytree(pair.delta, delta_bin, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = load_folder(pair.delta)
    # Stored transposed: a strided view in the file, read whole rather than in pieces.
    state["lm_head.weight"] = state["lm_head.weight"].t().contiguous().t()
    torch.save(state, delta_bin / "pytorch_model.bin")
    out = tmp_path / "out"
    run(DeltaJob(base=str(base_bin), target=str(out), delta=str(delta_bin), progress=False))
    got, want = load_folder(out), load_folder(merged)
    assert set(got) == set(want) and all(bits_equal(got[n], want[n]) for n in want)


def test_truncated_bin_shard_is_refused(pair, tmp_path):
    base_bin = to_bin_shards(pair.base, tmp_path / "base-bin", shards=2)
    shard = base_bin / "pytorch_model-00002-of-00002.bin"
    os.truncate(shard, shard.stat().st_size - 100)
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match="pytorch_model-00002-of-00002.bin is not a readable PyTorch checkpoint "
                                         r"\(truncated or corrupt"):
        run(job(pair, out, base=str(base_bin)))
    assert leftovers(out) == []


def test_small_pieces_give_the_same_model(pair, merged, tmp_path, monkeypatch):
    # Real models are merged in 64 MB pieces; tiny ones fit in one, so make the pieces tiny (and odd-sized).
    monkeypatch.setattr("bayling.delta.pieces.CHUNK_BYTES", 4002)
    out = tmp_path / "out"
    result = run(job(pair, out, max_shard_size="150KB", verify=True))
    assert result.verdict.startswith("verified: all")
    got, want = load_folder(out), load_folder(merged)
    assert set(got) == set(want) and all(bits_equal(got[n], want[n]) for n in want)
    assert all((out / f.name).read_bytes() == f.read_bytes() for f in merged.glob("*.safetensors"))


def test_bin_reader_handles_views_parameters_and_dtypes(tmp_path):
    square = torch.randn(4, 4)
    state = {"half": torch.randn(3, 4).half(), "bf16": torch.randn(5).bfloat16(),
             "param": torch.nn.Parameter(torch.randn(2, 2)), "strided": square[:, :2], "row": square[1],
             "empty": torch.zeros(0, 3)}
    torch.save(state, tmp_path / "x.bin")
    infos = torch_bin_tensors(tmp_path / "x.bin")
    fd = os.open(tmp_path / "x.bin", os.O_RDONLY)
    try:
        got = {i.name: read_tensor(i, fd) for i in infos}
    finally:
        os.close(fd)
    assert list(got) == list(state)
    assert all(torch.equal(got[n], state[n].detach()) and got[n].dtype == state[n].dtype for n in state)


def test_bin_reader_runs_no_code_from_the_pickle(tmp_path):
    import datetime

    torch.save({"w": torch.zeros(2), "when": datetime.date(2024, 1, 1)}, tmp_path / "odd.bin")
    with pytest.raises(DeltaError, match="not a plain state dict"):
        torch_bin_tensors(tmp_path / "odd.bin")


def _copy_delta(pair, tmp_path):
    return Path(shutil.copytree(pair.delta, tmp_path / "bad-delta"))


def _shard(folder, i=0):
    return sorted(folder.glob("model-*.safetensors"))[i]


def _resized_embedding(state):
    state["model.embed_tokens.weight"] = torch.zeros(state["model.embed_tokens.weight"].shape[0] + 8, 64,
                                                     dtype=torch.float16)


def _offline_hub(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    return "ICTNLP/not-in-this-cache"


BAD_DELTAS = {
    "missing tensor": (lambda d: edit_shard(d, lambda s: s.pop("model.embed_tokens.weight")),
                       ["1 tensor is in the base but not in the delta", "model.embed_tokens.weight"]),
    "resized embedding": (lambda d: edit_shard(d, _resized_embedding),
                          ["shape mismatch in model.embed_tokens.weight", "in the base vs", "in the delta", ", 64]"]),
    "truncated shard": (lambda d: os.truncate(_shard(d), _shard(d).stat().st_size // 2), ["is truncated"]),
    "unreadable shard": (lambda d: _shard(d, 1).write_bytes(b"\x10" * 64), ["not a valid safetensors file"]),
    "missing shard file": (lambda d: _shard(d, 1).unlink(), ["missing 1 of its", "incomplete"]),
    "no config": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "no weights": (lambda d: [f.unlink() for f in d.glob("model*")], ["no weights in the delta folder"]),
}


@pytest.mark.parametrize("case", list(BAD_DELTAS))
def test_bad_delta_is_refused_and_leaves_nothing(pair, tmp_path, case):
    breaker, phrases = BAD_DELTAS[case]
    bad = _copy_delta(pair, tmp_path)
    breaker(bad)
    out = tmp_path / "out"
    with pytest.raises(DeltaError) as e:
        run(job(pair, out, delta=str(bad)))
    message = str(e.value)
    assert "\n" not in message and all(p in message for p in phrases), message
    assert leftovers(out) == []


def test_resized_vocabulary_names_tensor_shapes_and_vocab(pair, tmp_path):
    config = tiny_config(len(pair.tokenizer) + 8)
    bigger = save_model(tmp_path / "bigger", config, seed=3, dtype=torch.float16)
    out = tmp_path / "out"
    with pytest.raises(DeltaError) as e:
        run(job(pair, out, delta=str(bigger)))
    v = len(pair.tokenizer)
    assert f"[{v}, 64] in the base vs [{v + 8}, 64] in the delta" in str(e.value)
    assert f"vocab_size is {v} in the base and {v + 8} in the delta" in str(e.value)
    assert leftovers(out) == []


def test_base_of_another_size_is_refused(pair, tmp_path):
    small = save_model(tmp_path / "small", tiny_config(len(pair.tokenizer), hidden=32, layers=3), seed=4)
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match=r"different model sizes \(base vs delta: hidden_size 32 vs 64, "
                                         r"num_hidden_layers 3 vs 2"):
        run(job(pair, out, base=str(small)))
    assert leftovers(out) == []


def test_hub_id_offline_says_pass_a_local_folder(pair, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match="HF_HUB_OFFLINE is set.*--delta-path /path/to/local/folder"):
        run(job(pair, out, delta=_offline_hub(pair, tmp_path, monkeypatch)))
    assert leftovers(out) == []


def test_non_empty_output_needs_force(pair, merged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DeltaError, match="is not empty; pass --force"):
        run(job(pair, out))
    assert (out / "keep.txt").read_text() == "mine"
    run(job(pair, out, force=True, max_shard_size="150KB"))
    assert not (out / "keep.txt").exists() and leftovers(out) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in merged.iterdir())


def test_too_little_disk_space_is_refused_before_writing(pair, tmp_path, monkeypatch):
    monkeypatch.setattr("bayling.delta.merge.free_bytes", lambda folder: 1000)
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match="not enough disk space .* needs 0.30 MB, 0.00 MB are free"):
        run(job(pair, out))
    assert leftovers(out) == []


def test_disk_full_mid_write_leaves_nothing(pair, tmp_path, monkeypatch):
    from bayling.delta import writer

    calls = []
    real_put = writer.ShardWriter._put

    def put(self, data):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        real_put(self, data)

    monkeypatch.setattr(writer.ShardWriter, "_put", put)
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match="the disk filled up while writing .*nothing was left behind"):
        run(job(pair, out))
    assert leftovers(out) == []


def test_verify_catches_a_wrong_tensor(pair, tmp_path, monkeypatch):
    from bayling.delta import writer

    real_write = writer.ShardWriter.write

    def write(self, name, tensor):
        real_write(self, name, tensor + 1 if name == "model.norm.weight" else tensor)

    monkeypatch.setattr(writer.ShardWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(DeltaError, match="verification failed: model.norm.weight differs"):
        run(job(pair, out, verify=True))
    assert leftovers(out) == []


def test_cli_prints_one_line_error_and_exits_non_zero(pair, tmp_path):
    bad = _copy_delta(pair, tmp_path)
    os.truncate(_shard(bad), 100)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "apply_delta.py"), "--base-model-path", str(pair.base),
                           "--target-model-path", str(out), "--delta-path", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "truncated" in proc.stderr and leftovers(out) == []


# The child merges slowly (a sleep per tensor) so the signal lands mid-way, with shards half written.
SLOW_MERGE = """
import runpy, sys, time
import bayling.delta.merge as merge
compute = merge.compute
merge.compute = lambda *a: (time.sleep(0.3), compute(*a))[1]
sys.argv = ["apply_delta.py"] + sys.argv[1:]
runpy.run_path("apply_delta.py", run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_merge_leaves_nothing(pair, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "--base-model-path", str(pair.base),
                             "--target-model-path", str(out), "--delta-path", str(pair.delta),
                             "--max-shard-size", "100KB"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # CI may start us with SIGINT ignored
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*/model-*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, "the merge ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc != 0, proc.stderr.read()[-2000:]
    if sig == signal.SIGINT:
        assert "error: interrupted; nothing was written" in proc.stderr.read()
    # After SIGKILL the watchdog process removes the folder: give it a moment.
    deadline = time.monotonic() + 10
    while leftovers(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(out) == []
