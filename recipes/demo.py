#!/usr/bin/env python
"""The BLSP demo: speech corpus -> step 1 -> step 2 -> evaluation on held-out speech.

    python recipes/demo.py                  # recipes/demo.yaml
    python recipes/demo.py --size full      # recipes/demo-full.yaml, the larger recipe
    python recipes/demo.py --recipe my.yaml

Each stage is a `blsp` command run in this process, and each resumes: re-run after a kill and
the demo picks up where it stopped. Writes OUT/report.json and OUT/report.png and prints them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from blsp.cli import main as blsp, option_flags as flags
from blsp.io import atomic_write_json


HERE = Path(__file__).parent
SIZES = {"default": HERE / "demo.yaml", "full": HERE / "demo-full.yaml"}


def run(stage: str, args: list[str], timings: dict) -> None:
    print(f"\n=== {stage}: blsp {' '.join(args)}", flush=True)
    start = time.perf_counter()
    status = blsp(args)
    timings[stage] = round(time.perf_counter() - start, 1)
    if status != 0:
        sys.exit(f"demo: stage '{stage}' failed (exit {status}); fix the cause and re-run to resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--recipe", default=None, help="a recipe file (overrides --size)")
    parser.add_argument("--output", default=None, help="default: runs/<recipe name>")
    args = parser.parse_args()
    recipe = yaml.safe_load(Path(args.recipe or SIZES[args.size]).read_text())
    out = Path(args.output or f"runs/{recipe['name']}")
    data, behavior, adapter = out / "data", out / "behavior", out / "adapter"
    models = recipe["models"]
    timings: dict[str, float] = {}

    d = dict(recipe["data"])
    data_recipe = HERE.parent / d.pop("recipe")  # recipe paths are relative to the repository
    run("speech corpus", ["data", "synth", "--recipe", str(data_recipe), "--output", str(data), *flags(d)], timings)
    for split in ("train", "test"):
        run(f"step 1 ({split})", ["continue", "--manifest", str(data / f"{split}.jsonl"), "--llm", models["llm"],
                                  "--output", str(behavior / f"{split}.jsonl"), *flags(recipe["continue"])], timings)
    train_flags = flags(recipe["train"])
    if "warm_start_corpus" in recipe:
        train_flags += ["--warm-start-data", str(warm_start_corpus(recipe, data, out / "data-warm-start", timings))]
    resume = ["--resume"] if (adapter / "checkpoints").exists() else []
    run("step 2", ["train", "--data", str(behavior / "train.jsonl"), "--encoder", models["encoder"],
                   "--llm", models["llm"], "--output-dir", str(adapter), *train_flags, *resume], timings)
    tasks = recipe["eval"]["tasks"]
    run("evaluation (trained)", ["eval", "--model", str(adapter), "--data", str(behavior / "test.jsonl"),
                                 "--tasks", tasks, "--output-dir", str(out / "eval")], timings)
    # The untrained adapter closes about none of the gap; a share of the clips shows that for less time.
    limit = recipe["eval"].get("untrained_limit")
    run("evaluation (untrained adapter)", ["eval", "--model", str(adapter), "--untrained", "--data",
                                           str(behavior / "test.jsonl"), "--tasks", "alignment",
                                           *(["--limit", str(limit)] if limit else []),
                                           "--output-dir", str(out / "eval_untrained")], timings)
    report(out, recipe, timings)


def warm_start_corpus(recipe: dict, data: Path, dest: Path, timings: dict) -> Path:
    """More sentences, spoken once each, for the warm start only (they need no step 1).

    Synthesised from the same data recipe and seed, so its test split is the demo's and its
    train split a superset of the demo's; checked here, since a test sentence heard in training
    would flatter every number of the report.
    """
    w = dict(recipe["warm_start_corpus"])
    data_recipe = HERE.parent / recipe["data"]["recipe"]
    w.setdefault("test_sentences", recipe["data"].get("test_sentences"))
    run("warm-start corpus", ["data", "synth", "--recipe", str(data_recipe), "--output", str(dest),
                              *flags({k: v for k, v in w.items() if v is not None})], timings)

    def sentences(manifest: Path) -> set[str]:
        return {json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()}

    leaked = sentences(dest / "train.jsonl") & sentences(data / "test.jsonl")
    if leaked:
        sys.exit(f"demo: {len(leaked)} test sentence(s) are in the warm-start corpus {dest}; "
                 "its data recipe or seed differs from the demo's")
    return dest / "train.jsonl"


def report(out: Path, recipe: dict, timings: dict) -> None:
    trained = json.loads((out / "eval" / "results.json").read_text())
    untrained = json.loads((out / "eval_untrained" / "results.json").read_text())
    summary = {"recipe": recipe, "timings_s": timings, "trained": trained, "untrained": untrained}
    atomic_write_json(out / "report.json", summary)
    print(f"\n=== report ({out / 'report.json'}; plots in {out / 'eval'} and {out / 'adapter' / 'train_loss.png'})")
    print(json.dumps({"timings_s": timings}, indent=1))


if __name__ == "__main__":
    main()
