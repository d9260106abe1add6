#!/usr/bin/env python
"""How much of the behaviour gap does a transcript with word errors close? (docs/warm_start_probe.md)

Corrupts the held-out transcripts at given rates (60% substitutions by words of the training
sentences, 20% deletions, 20% insertions; seeded) and feeds them to the LLM as text in the
transcript's place (the alignment report's cascade condition): maps the WER of what the LLM reads
to the gap it closes, the bar any speech representation has to pass. The adapter is not used for
these numbers; any trained model directory supplies the LLM and prompt.

    .venv/bin/python experiments/text_error_curve.py --model runs/demo/adapter --rates 0 0.1 0.2 0.3 0.45
"""

from __future__ import annotations

import argparse
import json
import random

from blsp.data import read_manifest
from blsp.evaluation import alignment_report
from blsp.features import FeatureCache
from blsp.metrics import error_rates
from blsp.modeling import BlspModel
from blsp.packaged import CACHE_DIR


def corrupt(words: list[str], rate: float, vocabulary: list[str], rng: random.Random) -> list[str]:
    out = []
    for w in words:
        r = rng.random()
        if r < rate * 0.6:
            out.append(rng.choice(vocabulary))
        elif r < rate * 0.8:
            continue
        elif r < rate:
            out += [w, rng.choice(vocabulary)]
        else:
            out.append(w)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train", default="runs/demo/behavior/train.jsonl", help="where substituted words come from")
    p.add_argument("--test", default="runs/ablation/test_unseen.jsonl")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.45])
    p.add_argument("--output", default="runs/text_error_curve.json")
    p.add_argument("--test-limit", type=int, default=None, help="only the first N test clips (a quick check)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = BlspModel.from_pretrained(args.model)
    test = read_manifest(args.test).utterances[: args.test_limit]
    refs = {u.id: u.extra.get("prompt_transcript") or u.text for u in test}
    vocabulary = [w for u in read_manifest(args.train).utterances
                  for w in (u.extra.get("prompt_transcript") or u.text).split()]
    cache = FeatureCache(CACHE_DIR / "features", model.config.feature_key)
    rows = []
    for rate in args.rates:
        rng = random.Random(args.seed)
        texts = {i: " ".join(corrupt(r.split(), rate, vocabulary, rng)) for i, r in refs.items()}
        wer = error_rates(list(refs.values()), [texts[i] for i in refs])["wer"]
        report = alignment_report(model, test, feature_cache=cache, asr_transcripts=texts, progress=False,
                                  bootstrap_samples=10)
        rows.append({"rate": rate, "wer": wer, "gap_closed": report["gap_closed_cascade"]})
        print(json.dumps(rows[-1]), flush=True)
    with open(args.output, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
