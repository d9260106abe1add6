#!/usr/bin/env python
"""The step-2 ablation: one fresh adapter per setting, equal budget, held-out unseen voice.

    .venv/bin/python recipes/ablation.py                   # every row of recipes/ablation.yaml
    .venv/bin/python recipes/ablation.py --rows plain ctc  # some of them
    .venv/bin/python recipes/ablation.py --table-only      # rebuild the table from finished rows

Each row runs `blsp train` and `blsp eval` in a subprocess (so its peak memory is its own) and
resumes: a finished row is skipped, a killed one continues from its last checkpoint. The table
goes to docs/ablation.{md,json,png}, each row with the date and the machine it ran on; rows run
on another machine (their runs/ablation/ROW is not here) are kept from the previous table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from blsp.audio import AudioRef
from blsp.options import option_flags
from blsp.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def blsp(*args: str, log: Path) -> None:
    """Run one `blsp` command; its output goes to `log` (tqdm included), failures stop the run."""
    cmd = [sys.executable, "-m", "blsp.cli", *args]
    print("$ blsp " + " ".join(args), flush=True)
    with open(log, "a") as out:
        status = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if status != 0:
        sys.exit(f"ablation: `blsp {args[0]}` failed (exit {status}); see {log}")


def select_test(source: Path, where: dict, dest: Path) -> Path:
    """The test lines matching `where`, with audio paths made relative to `dest`'s directory."""
    lines = []
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if all(record.get(k) == v for k, v in where.items()):
            record["audio"] = AudioRef.parse(record["audio"], source.parent).relative_to(dest.parent)
            lines.append(json.dumps(record))
    if not lines:
        sys.exit(f"ablation: no line of {source} matches {where}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, "\n".join(lines) + "\n")
    return dest


def run_row(row: dict, recipe: dict, test: Path, out: Path) -> None:
    run = out / row["name"]
    if (run / "eval" / "results.json").exists():
        print(f"= {row['name']}: done, skipped")
        return
    log = out / f"{row['name']}.log"
    if not (run / "train_summary.json").exists():
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        train = {**recipe["common"], **row["train"]}
        blsp("train", "--data", recipe["train_data"], "--output-dir", str(run), *option_flags(train), *resume, log=log)
    blsp("eval", "--model", str(run), "--data", str(test), "--tasks", recipe["eval_tasks"],
         "--output-dir", str(run / "eval"), log=log)
    atomic_write_json(run / "measured_on.json", {"date": datetime.date.today().isoformat(), "machine": machine()})


def row_result(row: dict, run: Path) -> dict | None:
    results, summary = run / "eval" / "results.json", run / "train_summary.json"
    if not (results.exists() and summary.exists()):
        return None
    r, s = json.loads(results.read_text()), json.loads(summary.read_text())
    measured = run / "measured_on.json"  # rows finished before it was written: this machine, today
    where = json.loads(measured.read_text()) if measured.exists() else {
        "date": datetime.date.today().isoformat(), "machine": machine()}
    a = r["alignment"]
    warm, train = s.get("warm_start_s", last_elapsed(run / "warm_start_log.json")), s.get("train_s")
    if train is None:  # a summary from before the trainer timed itself: the step log's clock
        train = last_elapsed(run / "train_log.jsonl")
    return {
        "name": row["name"],
        "what": row["what"],
        "flags": option_flags(row["train"]),
        "gap_closed": a["gap_closed"],
        "gap_closed_ci95": a.get("gap_closed_ci95"),
        "loss": a["loss"],
        "kl_text_speech": a["kl_text_speech"],
        "transcription_wer": r.get("transcription", {}).get("blsp", {}).get("wer"),
        "warm_start_steps": s["options"].get("warm_start_steps", 0) if s["options"].get("warm_start") != "none" else 0,
        "steps": s["steps"],
        "minutes": round((warm + train) / 60, 1) if train is not None else None,
        # Filling the feature cache: the encoder's (or Whisper's decoding's) cost per clip, paid once
        # per clip and shared by every row with the same features; None where the row did not pay it.
        "feature_minutes": round(s["features_s"] / 60, 1) if s.get("clips_encoded") else None,
        "clips_encoded": s.get("clips_encoded"),
        "peak_rss_gb": round(s["peak_rss_mb"] / 1024, 2) if "peak_rss_mb" in s else None,
        "n_test_utterances": a["n_utterances"],
        **where,
    }


def previous_rows(docs: Path) -> dict[str, dict]:
    """The last table's rows by name, each with its date and machine (older tables had one for all)."""
    path = docs.with_suffix(".json")
    if not path.exists():
        return {}
    meta = json.loads(path.read_text())
    return {r["name"]: {"date": meta.get("date"), "machine": meta.get("machine"), **r} for r in meta.get("rows", [])}


def feature_cell(row: dict) -> str:
    """"4.9 (1,900)": the minutes a row spent filling its feature cache, and for how many clips."""
    if row.get("feature_minutes") is None:
        return ""
    return f"{row['feature_minutes']} ({row['clips_encoded']:,})"


def last_elapsed(log: Path) -> float:
    """The `elapsed_s` of a JSON list or JSONL log's last record (0 when there is no log)."""
    if not log.exists():
        return 0.0
    text = log.read_text().strip()
    records = json.loads(text) if text.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    return float(records[-1]["elapsed_s"]) if records else 0.0


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpus} CPU cores ({model or platform.processor()}), {platform.system()}, torch CPU"


def cpu_label(machine: str | None) -> str:
    """"2 CPU cores (AMD EPYC 7B13), Linux, torch CPU" -> "AMD EPYC 7B13"; None -> "?"."""
    if not machine:
        return "?"
    name = machine[machine.find("(") + 1 : machine.rfind(")")] if "(" in machine else machine
    return name.replace("(R)", "").replace("(TM)", "")  # "Intel(R) Xeon(R) Processor" -> "Intel Xeon Processor"


def write_table(rows: list[dict], recipe: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"date": datetime.date.today().isoformat(), "machines": sorted({r["machine"] for r in rows if r.get("machine")}),
            "note": recipe.get("note"),
            "train_data": recipe["train_data"],
            "test_data": recipe["test_data"], "test_where": recipe["test_where"], "rows": rows}
    docs.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(docs.with_suffix(".json"), meta)

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}"

    md = [f"# Step-2 ablation (table made {meta['date']}; rows on {'; '.join(meta['machines'])})", "",
          f"Train: `{recipe['train_data']}`; test: `{recipe['test_data']}` where {recipe['test_where']} "
          f"({rows[0]['n_test_utterances'] if rows else 0} held-out sentences, a voice no row trained on). "
          "Made by `recipes/ablation.py` from `recipes/ablation.yaml`; numbers in `ablation.json`.", "",
          *([recipe["note"].strip(), ""] if recipe.get("note") else []),
          "| setting | gap closed % (95% CI) | speech loss | KL text‖speech | transcription WER % | warm-start steps | step-2 steps | minutes | feature minutes (clips) | peak RSS GB | measured |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["gap_closed_ci95"]
        ci_text = f" ({pct(ci[0])}–{pct(ci[1])})" if ci else ""
        md.append(f"| **{r['name']}**: {r['what']} | {pct(r['gap_closed'])}{ci_text} | {r['loss']['speech']:.3f} | "
                  f"{r['kl_text_speech']:.3f} | {pct(r['transcription_wer'])} | {r['warm_start_steps']} | {r['steps']} | "
                  f"{r['minutes']} | {feature_cell(r)} | {r['peak_rss_gb'] or '—'} | {r.get('date')}, {cpu_label(r.get('machine'))} |")
    if rows:
        md += ["", "Minutes: the warm start and step 2. Feature minutes: filling the feature cache (the "
                   "encoder, or Whisper's decoding with decoder states) for the clips named, paid once "
                   "per clip; blank where the row found them cached (rows before 2026-11-28 did not record it)."]
        md += ["", f"Floor (instruction only) {rows[0]['loss']['instruction']:.3f}, ceiling (transcript) "
                   f"{rows[0]['loss']['transcript']:.3f} nats per continuation token; gap closed = "
                   "(floor - speech) / (floor - ceiling)."]
    atomic_write_text(docs.with_suffix(".md"), "\n".join(md) + "\n")

    fig, ax = plt.subplots(figsize=(9, 5.4))
    for r in rows:
        if r["minutes"] is None:
            continue
        ci = r["gap_closed_ci95"]
        err = [[100 * (r["gap_closed"] - ci[0])], [100 * (ci[1] - r["gap_closed"])]] if ci else None
        x, y = r["minutes"], 100 * r["gap_closed"]
        points = ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
        if r.get("feature_minutes"):  # a dotted tail: what filling the feature cache added
            ax.hlines(y, x, x + r["feature_minutes"], colors=points[0].get_color(), linestyles=":")
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.axhline(50, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training minutes (warm start + step 2; dotted: + feature extraction)")
    ax.set_ylabel("gap closed on the unseen voice (%)")
    ax.set_title("step-2 ablation: behaviour alignment at equal budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print("\n".join(md))


def recipe_from_command_line(description: str, recipe_name: str, label: str) -> tuple[argparse.Namespace, dict]:
    """The command line this recipe and behaviour_ablation.py share (--recipe, --rows, --table-only)
    and the recipe it names; stops, `label` first, on a --rows name the recipe does not have."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / recipe_name))
    parser.add_argument("--rows", nargs="*", help="names of rows to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished rows")
    args = parser.parse_args()
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    unknown = set(args.rows or []) - {r["name"] for r in recipe["rows"]}
    if unknown:
        sys.exit(f"{label}: no row named {', '.join(sorted(unknown))} in {args.recipe}")
    return args, recipe


def chosen_rows(rows: list[dict], names: list[str] | None) -> list[dict]:
    """The rows --rows names, in the recipe's order; all of them when it names none."""
    return [row for row in rows if not names or row["name"] in names]


def main() -> None:
    args, recipe = recipe_from_command_line(__doc__, "ablation.yaml", "ablation")
    out = ROOT / recipe["output"]
    rows = recipe["rows"]
    if not args.table_only:
        test = select_test(ROOT / recipe["test_data"], recipe["test_where"], out / "test_selected.jsonl")
        for row in chosen_rows(rows, args.rows):
            run_row(row, recipe, test, out)
    before = previous_rows(ROOT / recipe["docs"])
    done = [res for row in rows if (res := row_result(row, out / row["name"]) or before.get(row["name"]))]
    write_table(done, recipe, ROOT / recipe["docs"])


if __name__ == "__main__":
    main()
