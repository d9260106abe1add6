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
              "--max-steps", "3", "--lr", "5e-3", "--warmup-steps", "1", "--feature-cache", str(tmp_path / "f")]
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
