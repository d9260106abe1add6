#!/usr/bin/env python
"""Step 2 from a saved warm start (issue #9's diagnostics; results in docs/warm_start_probe.md).

Loads a model saved by `experiments/warm_start_probe.py` (adapter and CTC head after the warm start
only), runs step 2 on behavior data as `blsp train` would after its warm start (rank-8 LoRA at
speech positions, CTC-compressed speech, batch 8), then measures on held-out speech the gap the
LLM closes and the CTC head's WER. Step-2 settings compared from one and the same warm start:

    .venv/bin/python experiments/step2_probe.py --model runs/probe/e2 --data runs/demo2/behavior/train.jsonl --out runs/s2/s0
    .venv/bin/python experiments/step2_probe.py --model runs/probe/e2 --data more.jsonl --steps 200 --out runs/s2/s5
"""
import argparse, json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from blsp.cpu import flush_denormals
flush_denormals()
from blsp.modeling import BlspModel
from blsp.options import TrainOptions
from blsp.trainer import Trainer
from blsp.distributed import DistInfo
from blsp.data import read_manifest
from blsp.evaluation import alignment_report, transcription_report
from blsp.features import FeatureCache
from blsp.packaged import CACHE_DIR
from blsp.metrics import error_rates
from blsp.behavior import read_behavior_data
from warm_start_probe import ctc_transcripts

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="runs/probe/e2")
p.add_argument("--data", default="runs/demo2/behavior/train.jsonl")
p.add_argument("--test", default="runs/demo/behavior/test_unseen.jsonl")
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--ctc-weight", type=float, default=0.5)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--lora-lr", type=float, default=None)
p.add_argument("--freeze-head", action="store_true")
p.add_argument("--freeze-adapter", action="store_true")
p.add_argument("--mix-transcribe", type=float, default=0.0)
p.add_argument("--max-target-tokens", type=int, default=None, help="train on each continuation's first N tokens")
p.add_argument("--lora-rank", type=int, default=8)
p.add_argument("--lora-alpha", type=float, default=None, help="default: twice the rank (peft's scale 2, as rank 8 with alpha 16)")
p.add_argument("--lora-modules", default="attention", help="attention, mlp, all, or names")
p.add_argument("--loss", default="ce", choices=["ce", "kl", "ce+kl"])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--transcribe", action="store_true", help="also zero-shot transcription WER (the LLM told to transcribe)")
args = p.parse_args()
torch.manual_seed(args.seed)
model = BlspModel.from_pretrained(args.model)
utts, _ = read_behavior_data([args.data])
opts = TrainOptions.from_flat(adapter_downsample=4, lr=args.lr, seed=args.seed, loss=args.loss, warmup_steps=10,
                    lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or 2.0 * args.lora_rank,
                    lora_modules=args.lora_modules, lora_lr=args.lora_lr,
                    batch_size=8, max_steps=args.steps, save_every=1000, ctc_weight=args.ctc_weight,
                    mix_transcribe=args.mix_transcribe, max_target_tokens=args.max_target_tokens)
tr = Trainer(model, utts, opts, args.out, DistInfo())
if args.freeze_head or args.freeze_adapter:
    frozen = set()
    if args.freeze_head:
        frozen |= {id(q) for q in model.ctc_head.parameters()}
    if args.freeze_adapter:
        frozen |= {id(q) for q in model.adapter.parameters()}
    for g in tr.optimizer.param_groups:
        g["params"] = [q for q in g["params"] if id(q) not in frozen]
    for q in list(model.ctc_head.parameters()) + list(model.adapter.parameters()):
        if id(q) in frozen:
            q.requires_grad_(False)
    tr.params = [q for q in tr.params if id(q) not in frozen]
t = time.perf_counter()
tr.train()
train_s = time.perf_counter() - t
test = read_manifest(args.test).utterances
cache = FeatureCache(CACHE_DIR / "features", model.config.feature_key)
hyps = ctc_transcripts(model, test, cache)
wer = error_rates([u.extra.get("prompt_transcript") or u.text for u in test], hyps)["wer"]
rep = alignment_report(model, test, feature_cache=cache, bootstrap_samples=200)
res = {"args": vars(args), "train_s": round(train_s, 1), "ctc_wer_after": wer, "gap_closed": rep["gap_closed"],
       "ci": rep["gap_closed_ci95"], "loss": rep["loss"]}
if args.transcribe:
    tr_rep = transcription_report(model, test, cascade=False, feature_cache=cache)
    res["transcription_wer"] = tr_rep["blsp"]["wer"]
    res["transcription_examples"] = [{k: r[k] for k in ("reference", "blsp")} for r in tr_rep["per_utterance"][:5]]
json.dump(res, open(f"{args.out}/step2_probe.json", "w"), indent=1)
print(json.dumps(res, indent=1))
