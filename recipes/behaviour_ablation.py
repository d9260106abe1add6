#!/usr/bin/env python
"""The behaviour ablation (issue: behave like the text path on any speech): one adapter per setting,
equal training budget, judged by what the LLM writes, not by the loss gap.

    make demo                                                   # its data, step 1 and suite first
    .venv/bin/python recipes/behaviour_ablation.py              # every row of recipes/behaviour_ablation.yaml
    .venv/bin/python recipes/behaviour_ablation.py --rows kl-nolora
    .venv/bin/python recipes/behaviour_ablation.py --table-only

Each row trains with `blsp train` (or evaluates an untrained adapter) and runs the demo's behaviour
suite (runs/demo/sets/suite.yaml: the unseen TTS voice, the same clips through a telephone band,
real human speech from packages) with `blsp eval --suite`. The text and cascade rows' answers do
not depend on the adapter: the first row answers them, the others read them from the answer cache
(blsp/answer_cache.py). A finished row is skipped, a killed one resumes. The table goes to
docs/behaviour_ablation.{md,json,png}: per set, KL(text||speech), agreement per instruction,
runaway answers, transcription WER, each beside the cascade's and its bar (blsp/parity.py).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from ablation import (  # recipes/ablation.py: the step-2 ablation's runner
    ROOT, blsp, chosen_rows, cpu_label, machine, recipe_from_command_line)
from blsp.io import atomic_write_json, atomic_write_text
from blsp.options import option_flags


def eval_flags(row: dict, recipe: dict) -> list[str]:
    flags = ["--suite", recipe["suite"], "--batch-size", str(recipe.get("eval_batch_size", 24))]
    if recipe.get("limit"):
        flags += ["--limit", str(recipe["limit"])]
    if row.get("untrained"):
        flags += ["--untrained", "--seed", "0"]
    return flags + option_flags(row.get("eval", {}))


def prepare(recipe: dict, needed: list[str], out: Path) -> None:
    """The extra training data the chosen rows name (`prepare:`: a `blsp` command per output file),
    each made once: an output already there is kept."""
    for step in recipe.get("prepare", []):
        if step["output"] in needed and not (ROOT / step["output"]).exists():
            out.mkdir(parents=True, exist_ok=True)
            blsp(*[str(a) for a in step["args"]], log=out / "prepare.log")
            if not (ROOT / step["output"]).exists():
                sys.exit(f"behaviour ablation: `blsp {step['args'][0]}` did not write {step['output']}")


def run_row(row: dict, recipe: dict, out: Path) -> None:
    run, log = out / row["name"], out / f"{row['name']}.log"
    given = row.get("untrained") or row.get("model")  # a saved model's config (untrained) or the model itself
    model = str(ROOT / given) if given else str(run)
    if (run / "eval" / "results.json").exists():
        print(f"= {row['name']}: done, skipped")
        run_extra_suites(row, recipe, run, model, log)
        return
    run.mkdir(parents=True, exist_ok=True)
    if not given and not (run / "train_summary.json").exists():
        resume = ["--resume"] if (run / "checkpoints").exists() else []
        train = {**recipe["common"], **row.get("train", {})}
        data = [str(ROOT / d) for d in row.get("train_data", [recipe["train_data"]])]
        blsp("train", "--data", *data, "--output-dir", str(run), *option_flags(train), *resume, log=log)
    blsp("eval", "--model", model, *eval_flags(row, recipe), "--output-dir", str(run / "eval"), log=log)
    atomic_write_json(run / "measured_on.json", {"date": datetime.date.today().isoformat(), "machine": machine()})
    run_extra_suites(row, recipe, run, model, log)


def run_extra_suites(row: dict, recipe: dict, run: Path, model: str, log: Path) -> None:
    """The recipe's `extra_suites` (name: suite file), each into ROW/eval-NAME/, once: more sets in
    the same table (e.g. every real clip, where the demo's suite asks 24)."""
    for name, suite in (recipe.get("extra_suites") or {}).items():
        if not (run / f"eval-{name}" / "results.json").exists():
            flags = eval_flags(row, {**recipe, "suite": suite, "limit": None})
            blsp("eval", "--model", model, *flags, "--output-dir", str(run / f"eval-{name}"), log=log)


def row_result(row: dict, run: Path) -> dict | None:
    results = run / "eval" / "results.json"
    if not results.exists():
        return None
    behaviour = json.loads(results.read_text()).get("behaviour") or {}
    for extra in sorted(run.glob("eval-*/results.json")):  # the extra suites' sets, where measured
        behaviour.update(json.loads(extra.read_text()).get("behaviour") or {})
    summary = (ROOT / row["model"] if row.get("model") else run) / "train_summary.json"
    minutes = None
    if summary.exists():
        s = json.loads(summary.read_text())
        minutes = round(s["train_s"] / 60, 1) if s.get("train_s") else None
    measured = run / "measured_on.json"
    where = json.loads(measured.read_text()) if measured.exists() else {}
    sets = {}
    for name, summ in behaviour.items():
        b, c = summ["rows"]["blsp"], summ["rows"]["cascade"]
        sets[name] = {"kl": b.get(summ["kl_measured_on"]), "kl_cascade": c.get(summ["kl_measured_on"]),
                      "agreement": b.get("agreement", {}), "agreement_cascade": c.get("agreement", {}),
                      "runaway": b.get("runaway"), "runaway_cascade": c.get("runaway"),
                      "wer": b.get("wer"), "wer_whisper": summ.get("whisper_wer"),
                      "bars_met": sum(bar["met"] is True for bar in summ["bars"].values()),
                      "bars": len(summ["bars"]), "gap_closed": b.get("gap_closed")}
    return {"name": row["name"], "what": row["what"], "train": row.get("train"), "eval": row.get("eval"),
            "untrained": bool(row.get("untrained")), "minutes": minutes, "sets": sets, **where}


def write_table(rows: list[dict], recipe: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"date": datetime.date.today().isoformat(), "suite": recipe["suite"], "train_data": recipe["train_data"],
            "common": recipe["common"], "note": recipe.get("note"), "rows": rows}
    docs.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(docs.with_suffix(".json"), meta)

    def num(x, kind="num"):
        if x is None:
            return "—"
        return {"num": f"{x:.3f}", "pct": f"{100 * x:.1f}", "score": f"{x:.0f}"}[kind]

    sets = sorted({s for r in rows for s in r["sets"]})
    md = [f"# Behaviour ablation (table made {meta['date']})", "",
          f"Suite `{recipe['suite']}`; train data `{recipe['train_data']}`; every trained row: "
          f"`blsp train` with {recipe['common']} plus its own flags. Made by `recipes/behaviour_ablation.py` "
          "from `recipes/behaviour_ablation.yaml`; numbers in `behaviour_ablation.json`. Each cell: BLSP / the "
          "cascade (Whisper's transcript to the same LLM). Bars (blsp/parity.py): KL <= 1.5x the cascade's, "
          "agreement >= 0.9x under every instruction, WER <= 1.5x Whisper's, runaway <= 1%.", "",
          *([recipe["note"].strip(), ""] if recipe.get("note") else [])]
    for name in sets:
        have = [r for r in rows if name in r["sets"]]
        instructions = list(have[0]["sets"][name]["agreement"]) if have else []
        md += [f"## {name}", "",
               "| setting | KL text‖speech | " + " | ".join(f"agree: {i}" for i in instructions)
               + " | runaway % | WER % (Whisper) | bars met | gap closed % | train min |",
               "|---|---|" + "---|" * len(instructions) + "---|---|---|---|---|"]
        for r in have:
            s = r["sets"][name]
            cells = [f"{num(s['agreement'].get(i), 'score')} / {num(s['agreement_cascade'].get(i), 'score')}"
                     for i in instructions]
            md.append(f"| **{r['name']}**: {r['what']} | {num(s['kl'])} / {num(s['kl_cascade'])} | " + " | ".join(cells)
                      + f" | {num(s['runaway'], 'pct')} / {num(s['runaway_cascade'], 'pct')} | "
                      f"{num(s['wer'], 'pct')} ({num(s['wer_whisper'], 'pct')}) | {s['bars_met']} of {s['bars']} | "
                      f"{num(s['gap_closed'], 'pct')} | {r['minutes'] or '—'} |")
        md.append("")
    md.append("Measured on: " + "; ".join(sorted({f"{r.get('date')}, {cpu_label(r.get('machine'))}" for r in rows})))
    atomic_write_text(docs.with_suffix(".md"), "\n".join(md) + "\n")

    fig, axes = plt.subplots(1, max(len(sets), 1), figsize=(5 * max(len(sets), 1), 4.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for r in rows:
            s = r["sets"].get(name)
            if not s or s["kl"] is None or not s["agreement"]:
                continue
            ratios = [s["agreement"][i] / s["agreement_cascade"][i] for i in s["agreement"]
                      if s["agreement_cascade"].get(i)]
            x, y = s["kl"] / s["kl_cascade"], min(ratios) if ratios else 0
            ax.plot(x, y, "o")
            ax.annotate(f"{r['name']} ({s['bars_met']}/{s['bars']} bars)", (x, y), textcoords="offset points",
                        xytext=(5, 3), fontsize=7)
        ax.axvline(1.5, color="gray", ls="--", lw=0.8)
        ax.axhline(0.9, color="gray", ls="--", lw=0.8)
        ax.set_xlim(left=0)  # linear: the ratios span a narrow range, where log ticks are unreadable
        ax.set_xlabel("KL(text||speech) / cascade's (bar: <= 1.5)")
        ax.set_ylabel("worst agreement / cascade's (bar: >= 0.9)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs.with_suffix(".png"), dpi=120)
    plt.close(fig)
    print("\n".join(md))


def main() -> None:
    args, recipe = recipe_from_command_line(__doc__, "behaviour_ablation.yaml", "behaviour ablation")
    out = ROOT / recipe["output"]
    rows = recipe["rows"]
    if not args.table_only:
        missing = [p for p in (recipe["suite"], recipe["train_data"]) if not (ROOT / p).exists()]
        if missing:
            sys.exit(f"behaviour ablation: {', '.join(missing)} missing: run `make demo` first (it writes both)")
        chosen = chosen_rows(rows, args.rows)
        prepare(recipe, [d for row in chosen for d in row.get("train_data", [])], out)
        for row in chosen:
            run_row(row, recipe, out)
    done = [res for row in rows if (res := row_result(row, out / row["name"]))]
    write_table(done, recipe, ROOT / recipe["docs"])


if __name__ == "__main__":
    main()
