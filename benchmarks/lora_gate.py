#!/usr/bin/env python
"""Speech-only LoRA: the branch on the speech rows alone against peft's branch masked everywhere.

    PYTHONPATH=. python benchmarks/lora_gate.py                   # the packaged SmolLM2-135M
    PYTHONPATH=. python benchmarks/lora_gate.py --rows 8 --length 90 --speech 20 --rounds 5

All in this process, on the same frozen LLM, batch and LoRA weights (rank 8 on attention and MLP,
random, as after training), with `--speech` positions of each row read as speech (the demo's
training rows: ~90 positions, ~20 of them speech). Three ways of giving LoRA to the speech
positions only, timed in turns, round after round, so the machine's drift hits all alike:
- ours: `blsp.lora`'s gate (peft runs the base layer; the gate adds the branch on the speech rows)
- masked: peft's own forward computes the branch at every position and a hook on `lora_B`
  multiplies it by the speech flags (blsp's way until 2026-11-27)
- none: LoRA off (the floor: the frozen LLM alone, gradient to the input embeddings only)
each as a training step (forward and backward to the input embeddings and LoRA) and as a no-grad
forward. Prints the median seconds, masked/ours and ours/none, checks that ours and masked give
the same hidden states (to float rounding), and writes benchmarks/results/lora_gate.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from blsp.cpu import flush_denormals
from blsp.lora import ADAPTER_NAME, LoraSettings, add_lora, lora_layers, parse_modules
from blsp.llm import load_language_model

import presets


def masked_gate(language_model, speech: torch.Tensor) -> list:
    """blsp's earlier speech-only LoRA on the same layers: peft's whole branch, zeroed off speech.
    (Our gate's hooks stay, with no positions set: they add nothing, as in the `none` way.)"""
    def scale(module, inputs, output):
        if output.dim() != 3:  # our gate's own branch on no rows (gradients on, no positions set)
            return output
        return output * speech[:, -output.shape[1]:, None].to(output.dtype)

    handles = []
    for module in lora_layers(language_model):
        handles.append(module.register_forward_pre_hook(lambda m, i: setattr(m, "_disable_adapters", False)))
        handles.append(module.lora_B[ADAPTER_NAME].register_forward_hook(scale))
    return handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=90)
    parser.add_argument("--speech", type=int, default=20, help="speech positions a row, from position 30")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way per round")
    parser.add_argument("--output", default="benchmarks/results/lora_gate.json")
    args = parser.parse_args()
    flush_denormals()
    torch.manual_seed(0)

    llm, _ = load_language_model(args.llm, torch.float32)
    llm.requires_grad_(False).eval()
    gate = add_lora(llm, LoraSettings(rank=8, where="speech", target_modules=parse_modules("all")))
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.02)
                p.requires_grad_(True)
    decoder = llm.get_decoder()
    d = llm.get_input_embeddings().embedding_dim
    embeds = torch.randn(args.rows, args.length, d) * 0.02
    speech = torch.zeros(args.rows, args.length, dtype=torch.bool)
    speech[:, 30:30 + args.speech] = True
    scored = slice(30 + args.speech, None)

    current = {"way": "ours"}

    def forward(x):
        # ours reads the speech positions from the gate; masked from its own hooks; none from nowhere
        # a fresh mask each forward, as in training (its speech rows are found once per forward)
        with gate.positions(speech.clone() if current["way"] == "ours" else None):
            return decoder(inputs_embeds=x, use_cache=False).last_hidden_state

    def train_step():
        x = embeds.clone().requires_grad_(True)
        forward(x)[:, scored].pow(2).mean().backward()

    def no_grad_forward():
        with torch.no_grad():
            return forward(embeds)

    @contextlib.contextmanager
    def way(name):
        handles = masked_gate(llm, speech) if name == "masked" else []
        current["way"] = name
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    with way("ours"):
        ours_hidden = no_grad_forward()
    with way("masked"):
        masked_hidden = no_grad_forward()
    # Relative to the hidden states' size (SmolLM2's have a few dimensions in the hundreds): float
    # sums in another order, through 30 layers.
    max_diff = float((ours_hidden - masked_hidden).abs().max() / masked_hidden.abs().max())
    rel_norm = float((ours_hidden - masked_hidden).norm() / masked_hidden.norm())
    print(f"ours against masked: max |diff| {max_diff:.1e} of the largest value, {rel_norm:.1e} of the norm")
    same = rel_norm < 1e-4

    ways = ("ours", "masked", "none")
    times = {(w, kind): [] for w in ways for kind in ("train", "no_grad")}
    for r in range(args.rounds):
        for w in ways:
            with way(w):
                for kind, fn in (("train", train_step), ("no_grad", no_grad_forward)):
                    fn()  # untimed: the first call of a way settles its caches
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        fn()
                    times[(w, kind)].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{w} {times[(w, 'train')][-1]:.3f}/{times[(w, 'no_grad')][-1]:.3f} s" for w in ways), flush=True)

    med = {f"{w}_{kind}_s": round(statistics.median(v), 4) for (w, kind), v in times.items()}
    result = {
        "machine": presets.machine(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
        "llm": args.llm, "rows": args.rows, "length": args.length, "speech_positions": args.speech,
        "lora": "rank 8, attention and MLP", "rounds": args.rounds, "steps_per_round": args.steps,
        "median": med, "same_hidden_states": same, "max_abs_diff_relative": max_diff, "diff_norm_relative": rel_norm,
        "masked_over_ours": {k: round(med[f"masked_{k}_s"] / med[f"ours_{k}_s"], 3) for k in ("train", "no_grad")},
        "ours_over_none": {k: round(med[f"ours_{k}_s"] / med[f"none_{k}_s"], 3) for k in ("train", "no_grad")},
        "rounds_s": {f"{w}_{kind}": [round(t, 4) for t in v] for (w, kind), v in times.items()},
    }
    print(f"\n{result['machine']}; {args.rows} rows x {args.length} positions, {args.speech} of them speech")
    print(f"{'':10}{'train step':>12}{'no-grad fwd':>13}")
    for w in ways:
        print(f"{w:10}{med[f'{w}_train_s']:>11.3f}s{med[f'{w}_no_grad_s']:>12.3f}s")
    print(f"masked/ours: train {result['masked_over_ours']['train']:.2f}x, "
          f"no-grad {result['masked_over_ours']['no_grad']:.2f}x; ours/none: train "
          f"{result['ours_over_none']['train']:.2f}x, no-grad {result['ours_over_none']['no_grad']:.2f}x; "
          f"same hidden states: {same} (difference {rel_norm:.1e} of their norm)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit("ours and masked disagree: the speech-row branch is wrong")


if __name__ == "__main__":
    main()
