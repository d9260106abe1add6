#!/usr/bin/env python
"""Step-1 throughput: generated tokens/s of `blsp continue`'s decoding against the original's way.

    .venv/bin/python benchmarks/continue.py                       # 96 sentences, packaged SmolLM2
    .venv/bin/python benchmarks/continue.py --sentences 256 --llm DIR

Both run in this process on the same transcripts, LLM and prompt, greedy, same token limit:
- original: batches of 8 in corpus order, left padding, `generate` (finished rows keep decoding
  until the batch's longest one ends);
- ours: batches of `--batch-size` sorted by prompt length, and `greedy_generate`, which drops
  each row and its KV cache as soon as it has stopped.
With vLLM installed beside a CUDA GPU, `blsp continue --backend vllm` runs on the same prompts too
(its tokens/s is printed; skipped with a message otherwise).
Prints the ratio and writes benchmarks/results/continue.json. Both must produce the same text
(checked: a speed-up that changed the continuations would be a bug, not a win).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from blsp.continuation import ContinueOptions, Continuer
from blsp.corpus import gather_sentences
from blsp.data import normalize_transcript
from blsp.io import atomic_write_json
from blsp.llm import load_language_model

HERE = Path(__file__).parent


def original_way(continuer: Continuer, prompts: list[list[int]], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[continuer.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = continuer.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=continuer.stop_ids, pad_token_id=continuer.pad_id)
        out += [until_stop(row, continuer.stop_ids) for row in gen[:, width:].tolist()]
    return out


def until_stop(row: list[int], stop_ids) -> list[int]:
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[: i + 1]
    return row


def our_way(continuer: Continuer, prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    from blsp.continuation import greedy_generate

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [prompts[i] for i in idx]
        width = max(map(len, batch))
        ids = torch.tensor([[continuer.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        rows = greedy_generate(continuer.model, ids, mask, continuer.options.max_new_tokens, continuer.stop_ids)
        for i, row in zip(idx, rows):
            out[i] = row
    return out


def vllm_row(args, prompts: list[list[int]], tokenizer) -> dict:
    """`blsp continue --backend vllm` on the same prompts, where vLLM and a CUDA GPU are there."""
    from blsp.continuation import VllmContinuer, choose_backend
    from blsp.packaged import resolve

    if choose_backend("auto") != "vllm":
        print("    vllm: skipped (not installed, or no CUDA GPU: pip install vllm on a GPU machine)", flush=True)
        return {"skipped": "vLLM not installed or no CUDA GPU"}
    continuer = VllmContinuer(resolve(args.llm), tokenizer, ContinueOptions(llm=args.llm,
                                                                         max_new_tokens=args.max_new_tokens))
    start = time.perf_counter()
    texts = continuer.continue_batch(prompts)
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text, _ in texts)  # re-encoded
    print(f"    vllm: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    return {"seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--sentences", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default=str(HERE / "results" / "continue.json"))
    args = parser.parse_args()

    sentences, _ = gather_sentences(["fortunes", "wordnet"], [], min_words=6, max_words=25)
    sentences = [normalize_transcript(s) for s in sentences[: args.sentences]]
    model, tokenizer = load_language_model(args.llm)
    model.eval()
    continuer = Continuer(model, tokenizer, ContinueOptions(llm=args.llm, max_new_tokens=args.max_new_tokens))
    prompts = [continuer.prompt_ids(s) for s in sentences]

    timings, outputs = {}, {}
    for name, run in (("original", lambda: original_way(continuer, prompts, 8, args.max_new_tokens)),
                      ("ours", lambda: our_way(continuer, prompts, args.batch_size))):
        start = time.perf_counter()
        outputs[name] = run()
        timings[name] = time.perf_counter() - start
        tokens = sum(map(len, outputs[name]))
        print(f"{name:>8}: {tokens} tokens in {timings[name]:.1f} s = {tokens / timings[name]:.1f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(outputs["original"], outputs["ours"]))
    tokens = sum(map(len, outputs["ours"]))
    vllm = vllm_row(args, prompts, tokenizer)
    result = {
        "benchmark": "continue", "llm": args.llm, "sentences": len(prompts), "max_new_tokens": args.max_new_tokens,
        "generated_tokens": tokens, "seconds": {k: round(v, 2) for k, v in timings.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in timings.items()},
        "speedup": round(timings["original"] / timings["ours"], 2),
        "identical_continuations": f"{same}/{len(prompts)}",
        "vllm": vllm,
        "machine": f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, result)
    print(f"speed-up {result['speedup']}x over the original's way; identical continuations {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
