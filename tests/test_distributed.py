"""torchrun with 2 processes on CPU (gloo) gives the same result as 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_corpus

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def blsp(args, nproc, tmp_path):
    env = {**os.environ, "BLSP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "blsp.cli", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "blsp.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_training_equals_one_process_with_the_same_global_batch(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=6, with_continuation=True)
    common = ["train", "--data", str(data), "--encoder", tiny_dirs["encoder"], "--llm", tiny_dirs["llm"],
              "--max-steps", "3", "--lr", "5e-3", "--warmup-steps", "1", "--feature-cache", str(tmp_path / "f"),
              "--preset", "paper"]
    blsp(common + ["--output-dir", str(tmp_path / "one"), "--batch-size", "4"], 1, tmp_path)
    blsp(common + ["--output-dir", str(tmp_path / "two"), "--batch-size", "2"], 2, tmp_path)
    one = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    for k in one:
        # Adam turns fp-noise in near-zero gradients into updates of up to lr: compare at 1/25 of lr.
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=2e-4, msg=k)
    log_one = [json.loads(l)["loss"] for l in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(l)["loss"] for l in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log_two == pytest.approx(log_one, rel=1e-4)
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["world_size"] == 2


def test_two_process_continue_writes_every_utterance_once(tiny_dirs, tmp_path):
    manifest = write_corpus(tmp_path / "data", n=5)
    out = tmp_path / "behavior.jsonl"
    args = ["continue", "--manifest", str(manifest), "--llm", tiny_dirs["llm"], "--output", str(out),
            "--max-new-tokens", "6", "--batch-size", "2"]
    blsp(args, 2, tmp_path)
    two = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(two) == [f"u{i}" for i in range(5)] and len(out.read_text().splitlines()) == 5, out.read_text()
    assert not list(tmp_path.glob("behavior.jsonl.rank*"))
    single = tmp_path / "single.jsonl"
    blsp(args[:-5] + [str(single), "--max-new-tokens", "6", "--batch-size", "2"], 1, tmp_path)
    one = {r["id"]: r for r in map(json.loads, single.read_text().splitlines())}
    assert {k: v["continuation"] for k, v in one.items()} == {k: v["continuation"] for k, v in two.items()}


def adapter_and_losses(run_dir):
    losses = [json.loads(l)["loss"] for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return load_file(str(run_dir / "adapter.safetensors")), losses


def test_two_process_fsdp_training_equals_one_process_without_it(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=6, with_continuation=True)
    common = ["train", "--data", str(data), "--encoder", tiny_dirs["encoder"], "--llm", tiny_dirs["llm"],
              "--max-steps", "3", "--lr", "5e-3", "--warmup-steps", "1", "--feature-cache", str(tmp_path / "f"),
              "--loss", "ce+kl", "--preset", "paper"]
    blsp(common + ["--output-dir", str(tmp_path / "one"), "--batch-size", "4"], 1, tmp_path)
    proc = blsp(common + ["--output-dir", str(tmp_path / "two"), "--batch-size", "2", "--fsdp"], 2, tmp_path)
    assert "fsdp: 2 decoder layers of the LLM sharded across 2 rank(s)" in proc.stderr
    one, log_one = adapter_and_losses(tmp_path / "one")
    two, log_two = adapter_and_losses(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=2e-4, msg=k)
    assert log_two == pytest.approx(log_one, rel=1e-4)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["options"]["fsdp"] and summary["world_size"] == 2


def test_two_processes_stream_their_own_shards_each_utterance_once_per_epoch(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=7, with_continuation=True)
    blsp(["data", "shard", "--manifest", str(data), "--output", str(tmp_path / "shards"), "--shard-size", "2"],
         1, tmp_path)
    assert len(list((tmp_path / "shards").glob("shard-*.tar"))) == 4
    common = ["train", "--data", str(tmp_path / "shards"), "--encoder", tiny_dirs["encoder"], "--llm",
              tiny_dirs["llm"], "--epochs", "2", "--batch-size", "2", "--lr", "5e-3", "--warmup-steps", "1",
              "--shuffle-buffer", "2", "--preset", "paper"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        blsp(common + ["--output-dir", str(run)], 2, tmp_path)
    steps = {}
    for rank in range(2):
        for line in (runs[0] / "data_order" / f"rank-{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault(rec["step"], []).extend(rec["ids"])
    log = [json.loads(l) for l in (runs[0] / "train_log.jsonl").read_text().splitlines()]
    assert sorted(steps) == [r["step"] for r in log]
    assert [r["samples"] for r in log] == [len(steps[s]) for s in sorted(steps)]
    # Epochs are whole steps: split the steps where the ids seen so far repeat one.
    epochs, seen = [[]], set()
    for s in sorted(steps):
        if seen & set(steps[s]):
            epochs.append([])
            seen = set()
        seen |= set(steps[s])
        epochs[-1] += steps[s]
    assert len(epochs) == 2
    for ids in epochs:
        assert sorted(ids) == [f"u{i}" for i in range(7)], epochs
    (a, log_a), (b, log_b) = adapter_and_losses(runs[0]), adapter_and_losses(runs[1])
    assert log_a == log_b
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
