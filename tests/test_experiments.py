"""The probe scripts under experiments/: each still imports and parses its options, and each has
its line in experiments/README.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))


def test_every_script_is_listed_in_the_readme():
    readme = (ROOT / "experiments" / "README.md").read_text()
    assert SCRIPTS and all(f"`{name}`" in readme for name in SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_imports_and_shows_its_help(name):
    # Its own process: the probes set process-wide torch state (flush_denormals) as they start.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / name), "--help"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {name}")
