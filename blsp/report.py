"""A suite's results for people: the printed tables and one PNG per task.

Plain text, no terminal library: the same table reads in a log file, a CI page or a terminal.
"""

from __future__ import annotations

from pathlib import Path

from .parity import format_parity, parity_summary
from .voice import VOICE_ATTRIBUTES

# voice_description's cells are shares of clips: its overall and one per attribute
PERCENT = {"wer", "cer", "accuracy", "macro_f1", "gap_closed", "runaway", "overall", *VOICE_ATTRIBUTES}
CI_SUFFIX = "_ci"  # a cell `<metric>_ci` is [low, high], the 95% interval of the cell `<metric>`
LABELS = {"wer": "WER", "cer": "CER", "bleu": "BLEU", "chrf": "chrF", "accuracy": "accuracy",
          "accuracy_ci": "95% CI", "overall": "all attributes", "overall_ci": "95% CI",
          "macro_f1": "macro-F1", "loss": "loss", "gap_closed": "gap closed", "kl": "KL(text||row)",
          "agreement": "agreement BLEU", "runaway": "runaway", "unmapped": "unmapped", "cosine_same": "cos",
          "cosine_mismatched": "cos other utt", "centred_same": "centred",
          "centred_different": "c. other instr", "centred_mismatched": "c. other utt"}
ROW_NAMES = {"blsp": "BLSP (speech)", "cascade": "cascade (ASR->LLM)", "text": "text (gold->LLM)",
             "asr": "ASR transcript itself", "floor": "instruction only", "contrast": "contrast adapter",
             "described": "described (gold+voice->LLM)", "heard": "heard (channel's classifier)"}


def fmt(metric: str, value) -> str:
    if value is None:
        return "n/a"
    if metric.endswith(CI_SUFFIX):
        base = metric[: -len(CI_SUFFIX)]
        return f"{fmt(base, value[0])}..{fmt(base, value[1])}"
    if metric in PERCENT:
        return f"{100 * value:.1f}%"
    if metric == "unmapped":
        return str(value)
    if metric in ("bleu", "chrf", "agreement") or metric.startswith("agree:"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def _columns(result: dict) -> list[str]:
    cols: list[str] = []
    for values in result["table"].values():
        cols += [c for c in values if c not in cols]
    return cols


def format_task(name: str, result: dict) -> list[str]:
    m = result["manifest"]
    head = f"{name} [{result['type']}] {m['n_evaluated']} of {m['n_total']} utterance(s) from {m['path']}"
    if m.get("where"):
        where = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in m["where"].items())
        head += f" (where {where}: {m['n_selected']} line(s))"
    lines = [head]
    cols = _columns(result)
    width = max(len(ROW_NAMES.get(r, r)) for r in result["table"]) + 2
    if result.get("table_note"):
        lines.append(f"  ({result['table_note']})")
    lines.append("  " + " " * width + "".join(f"{LABELS.get(c, c):>16}" for c in cols))
    for row, values in result["table"].items():
        cells = "".join(f"{fmt(c, values.get(c)):>16}" for c in cols)
        lines.append("  " + f"{ROW_NAMES.get(row, row):<{width}}" + cells)
    if result["type"] == "translation" and result.get("signatures"):
        lines.append(f"  sacrebleu: BLEU {result['signatures']['bleu']}; chrF {result['signatures']['chrf']}")
    if result["type"] == "classification":
        n = sum(len(d["unmapped_answers"]) for d in result["details"].values())
        if n:
            lines.append(f"  {n} answer(s) mapped to no label: counted wrong, listed under details.*.unmapped_answers")
    if result["type"] == "continuation" and result.get("alignment", {}).get("gap_closed_ci95"):
        lo, hi = result["alignment"]["gap_closed_ci95"]
        lines.append(f"  gap closed by speech, 95% bootstrap CI: {fmt('gap_closed', lo)} .. {fmt('gap_closed', hi)}")
    if result["type"] == "representation":
        lines += _layer_lines(result)
    return lines


def _layer_lines(result: dict) -> list[str]:
    """Cosine per layer (raw and centred; same instruction and the mismatched control), every
    layer up to 16 of them, else about 12 evenly spaced ones."""
    layers = result["layers"]
    step = 1 if len(layers) <= 16 else max(1, len(layers) // 12)
    shown = sorted(set(layers[::step]) | {layers[-1]})
    cols = []
    for model, sims in result["models"].items():
        for centred in (False, True):
            for cond, short in (("same_instruction", "same"), ("mismatched_utterance", "other utt")):
                values = (sims["centred"] if centred else sims).get(cond)
                if values:
                    cols.append((f"{model} {'c. ' if centred else ''}{short}", values))
    out = ["  per layer" + " " * 5 + "".join(f"{name:>22}" for name, _ in cols)]
    for layer in shown:
        out.append(f"  layer {layer:>3}" + " " * 5 + "".join(f"{values[layer]:>22.3f}" for _, values in cols))
    out.append("  (c. = centred: speech and transcript states each minus their modality's mean; other utt = "
               "speech vs another utterance's transcript, the control)")
    return out


def format_suite(results: dict) -> str:
    ident = results["identity"]
    sha = ident.get("adapter_sha256")
    lines = [f"suite {ident['suite']['name']} ({len(results['tasks'])} task(s)): adapter "
             f"{ident.get('model_dir') or 'untrained'}{f' (sha256 {sha[:12]})' if sha else ''}, "
             f"LLM {ident['llm_name']}, encoder {ident['encoder_name']}"]
    for set_name, summary in (results.get("behaviour") or {}).items():
        lines += ["", f"[{set_name}]" if set_name else "", *format_parity(summary)]
    for name, result in results["tasks"].items():
        lines.append("")
        lines += format_task(name, result)
    return "\n".join(lines)


def behaviour_headline(tasks: dict[str, dict]) -> dict[str, dict]:
    """Per speech set (the tasks' `set`), the behaviour measures beside the cascade's and the bars
    (blsp.parity.parity_summary); sets with no speech row are left out."""
    sets: dict[str, dict[str, dict]] = {}
    for name, result in tasks.items():
        sets.setdefault(result.get("set", ""), {})[name] = result
    out = {}
    for set_name, group in sets.items():
        summary = parity_summary(group)
        if summary is not None:
            out[set_name] = summary
    return out


def plot_task(name: str, result: dict, png_path: str | Path) -> None:
    """One panel per metric, one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in _columns(result) if c != "unmapped" and not c.endswith(CI_SUFFIX)]
    colors = {"blsp": "#d9534f", "cascade": "#f0ad4e", "text": "#5cb85c", "asr": "#5bc0de", "floor": "#999999",
              "contrast": "#337ab7", "described": "#2e7d32"}
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 0.5, 3.6), squeeze=False)
    for ax, col in zip(axes[0], cols):
        rows = [r for r, v in result["table"].items() if v.get(col) is not None]
        values = [result["table"][r][col] * (100 if col in PERCENT else 1) for r in rows]
        bars = ax.bar(rows, values, color=[colors.get(r, "#777777") for r in rows], yerr=_error_bars(result, col, rows))
        for bar, row in zip(bars, rows):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), fmt(col, result["table"][row][col]),
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(LABELS.get(col, col) + (" (%)" if col in PERCENT else ""), fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = result["manifest"]
    fig.suptitle(f"{name} ({result['type']}, {m['n_evaluated']} utterances)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _error_bars(result: dict, col: str, rows: list[str]):
    """The (below, above) distances to a cell's 95% interval, for matplotlib's yerr; None if it has none."""
    table, scale = result["table"], 100 if col in PERCENT else 1
    cis = [table[r].get(col + CI_SUFFIX) for r in rows]
    if not any(cis):
        return None
    # at 0% or 100% the interval's end differs from the value by rounding (-7e-18): matplotlib refuses
    below = [max(0.0, scale * (table[r][col] - ci[0])) if ci else 0 for r, ci in zip(rows, cis)]
    above = [max(0.0, scale * (ci[1] - table[r][col])) if ci else 0 for r, ci in zip(rows, cis)]
    return [below, above]


def write_plots(results: dict, out_dir: Path) -> list[str]:
    """`<task>.png` per task (and `<task>_alignment.png` for continuation tasks); the file names."""
    from .representation import plot_representation
    from .scoring import plot_alignment

    written = []
    for name, result in results["tasks"].items():
        path = out_dir / f"{_safe(name)}.png"
        if result["type"] == "representation":
            plot_representation(result, path, title=name)
        else:
            plot_task(name, result, path)
        written.append(path.name)
        if result.get("alignment"):
            extra = out_dir / f"{_safe(name)}_alignment.png"
            plot_alignment(result["alignment"], extra, title=name)
            written.append(extra.name)
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
