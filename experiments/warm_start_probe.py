#!/usr/bin/env python
"""How far does the warm start alone get? (issue #9's diagnostics; results in docs/warm_start_probe.md)

Trains a fresh adapter and CTC head on cached encoder features only (`blsp.warmstart`, no LLM
forward), then measures on held-out speech: the CTC head's own greedy transcription (WER, jiwer
after Whisper's English normaliser) and the gap the LLM closes when it reads the CTC-compressed
speech with no step 2 at all. Saves the model (a `--model` for `blsp eval`, or a start for step 2).

    .venv/bin/python experiments/warm_start_probe.py --output runs/probe/ds4 --adapter-downsample 4
    .venv/bin/python experiments/warm_start_probe.py --output runs/probe/more --extra runs/wsdata/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from blsp.cpu import flush_denormals
from blsp.data import read_manifest
from blsp.evaluation import alignment_report
from blsp.features import FeatureCache
from blsp.metrics import error_rates
from blsp.modeling import BlspModel
from blsp.packaged import CACHE_DIR
from blsp.processing import pad_features
from blsp.vocabulary import ctc_vocabulary
from blsp.warmstart import WarmStartRun, ctc_warm_start, transcript_tokens


def ctc_transcripts(model: BlspModel, utterances, cache: FeatureCache, batch_size: int = 16) -> list[str]:
    """Greedy CTC decode of each clip through the model's CTC head, as text."""
    head, vocab, tok = model.ctc_head, model.config.ctc_vocab, model.processor.tokenizer
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(utterances), batch_size):
            utts = utterances[i : i + batch_size]
            feats, lengths = pad_features([cache.load(u.audio) for u in utts])
            x, out_lengths = model.speech_embeddings(feats, lengths)
            labels = head.log_probs(x).argmax(-1)
            for row, n in zip(labels, out_lengths.tolist()):
                ids, prev = [], 0
                for c in row[:n].tolist():
                    if c and c != prev:
                        ids.append(vocab[c - 1])
                    prev = c
                out.append(tok.decode(ids))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="runs/demo/behavior/train.jsonl")
    p.add_argument("--extra", nargs="*", default=[], help="more manifests for the warm start (transcripts only)")
    p.add_argument("--test", default="runs/ablation/test_unseen.jsonl", help="held-out behavior data")
    p.add_argument("--output", required=True)
    p.add_argument("--method", default="ctc", choices=["ctc", "embed"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--adapter", default="conv", choices=["conv", "stack"])
    p.add_argument("--adapter-downsample", type=int, default=8)
    p.add_argument("--speech-vectors", default="adapter", choices=["adapter", "tokens"])
    p.add_argument("--test-limit", type=int, default=None, help="only the first N test clips (a quick check)")
    p.add_argument("--ctc-min-count", type=int, default=1,
                   help="the head's tokens: those seen this often, rarer ones spelled with them (blsp.vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-masks", type=int, default=0, help="SpecAugment: time masks per clip")
    p.add_argument("--feature-masks", type=int, default=0, help="SpecAugment: feature masks per clip")
    p.add_argument("--unfreeze-encoder-layers", type=int, default=0,
                   help="train the encoder's top N layers with the adapter (features cached below them)")
    p.add_argument("--encoder-lr", type=float, default=None, help="their learning rate (default: --lr)")
    args = p.parse_args()

    flush_denormals()  # before torch's first parallel op: see blsp/cpu.py
    torch.manual_seed(args.seed)
    model = BlspModel.from_components(adapter_type=args.adapter, adapter_downsample=args.adapter_downsample,
                                      seed=args.seed)
    model.unfreeze_encoder_layers(args.unfreeze_encoder_layers)  # before the cache: it is keyed by the layer
    cache = FeatureCache(CACHE_DIR / "features", model.config.feature_key)
    train = [u for path in [args.train, *args.extra] for u in read_manifest(path).utterances]
    test = read_manifest(args.test).utterances[: args.test_limit]
    cache.fill(model, train + test)
    tok = model.processor.tokenizer
    vocab = ctc_vocabulary([transcript_tokens(tok, u) for u in train], tok, args.ctc_min_count)
    model.enable_ctc_compression(vocab, args.speech_vectors)

    start = time.perf_counter()
    log = ctc_warm_start(model, train, cache, WarmStartRun(args.method, args.steps, args.lr, args.batch_size,
                                                               args.seed, time_masks=args.time_masks,
                                                               feature_masks=args.feature_masks,
                                                               encoder_lr=args.encoder_lr))
    seconds = time.perf_counter() - start
    hyps = ctc_transcripts(model, test, cache)
    refs = [u.extra.get("prompt_transcript") or u.text for u in test]
    wer = error_rates(refs, hyps)
    report = alignment_report(model, test, feature_cache=cache, bootstrap_samples=200)
    result = {"options": vars(args), "train_clips": len(train), "test_clips": len(test),
              "warm_start_s": round(seconds, 1), "ctc_loss_last_20_steps": sum(r["ctc_loss"] for r in log[-20:]) / max(1, len(log[-20:])),
              "ctc_wer": wer["wer"], "gap_closed": report["gap_closed"], "gap_closed_ci95": report["gap_closed_ci95"],
              "loss": report["loss"], "examples": [{"reference": r, "ctc": h} for r, h in zip(refs[:5], hyps[:5])]}
    model.save_pretrained(args.output)
    with open(f"{args.output}/probe.json", "w") as f:
        json.dump({**result, "log": log}, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
