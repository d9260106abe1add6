#!/usr/bin/env bash
# The whole BLSP pipeline on the packaged models, small enough for a 2-core CPU in minutes:
#   speech (flite TTS) -> step 1 `blsp continue` -> step 2 `blsp train` -> `blsp generate`.
# Every stage resumes: re-run after a kill and it picks up where it stopped.
# A held-out voice (slt) is never trained on. The larger data recipe lives in later recipes.
set -euo pipefail
export HF_HUB_OFFLINE=1
here="$(cd "$(dirname "$0")" && pwd)"
out="${BLSP_RUN_DIR:-runs/quickstart}"
steps="${QUICKSTART_STEPS:-30}"
mkdir -p "$out/wav"

echo "== speech: ten sentences in three training voices and one held-out voice"
: > "$out/train.jsonl.tmp"; : > "$out/test.jsonl.tmp"
n=0
while IFS= read -r sentence; do
  for voice in awb rms kal16 slt; do
    wav="wav/s${n}_${voice}.wav"
    [ -s "$out/$wav" ] || flite -voice "$voice" -t "$sentence" -o "$out/$wav"
    line=$(python3 -c 'import json,sys; print(json.dumps({"id": sys.argv[1], "audio": sys.argv[2], "text": sys.argv[3]}))' \
           "s${n}_${voice}" "$wav" "$sentence")
    if [ "$voice" = slt ]; then echo "$line" >> "$out/test.jsonl.tmp"; else echo "$line" >> "$out/train.jsonl.tmp"; fi
  done
  n=$((n + 1))
done < "$here/quickstart_sentences.txt"
mv "$out/train.jsonl.tmp" "$out/train.jsonl"; mv "$out/test.jsonl.tmp" "$out/test.jsonl"

echo "== packaged models (converted once into \$BLSP_CACHE)"
blsp models --convert whisper-base smollm2-135m-instruct

echo "== step 1: the LLM continues each transcript"
blsp continue --manifest "$out/train.jsonl" --output "$out/behavior.jsonl" --batch-size 16

echo "== step 2: train the adapter ($steps steps)"
resume=""; [ -d "$out/adapter/checkpoints" ] && resume="--resume"
blsp train --data "$out/behavior.jsonl" --output-dir "$out/adapter" --max-steps "$steps" \
  --batch-size 6 --lr 2e-3 --warmup-steps 5 --save-every 10 $resume

echo "== inference on the held-out voice"
blsp generate --model "$out/adapter" --manifest "$out/test.jsonl" --task continue \
  --output "$out/test_continue.jsonl" --max-new-tokens 40
blsp generate --model "$out/adapter" --manifest "$out/test.jsonl" --task transcribe \
  --output "$out/test_transcribe.jsonl" --max-new-tokens 40
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for task in ("continue", "transcribe"):
    for line in open(f"{out}/test_{task}.jsonl"):
        r = json.loads(line)
        rows.setdefault(r["id"], {"text": r["text"]})[task] = r["prediction"]
for i, (uid, r) in enumerate(sorted(rows.items())[:4]):
    print(f"\n[{uid}] transcript : {r['text']}\n  continue   : {r['continue']}\n  transcribe : {r['transcribe']}")
log = [json.loads(l) for l in open(f"{out}/adapter/train_log.jsonl")]
print(f"\ntraining loss: {log[0]['loss']:.3f} (step 1) -> {log[-1]['loss']:.3f} (step {log[-1]['step']}); "
      f"curve in {out}/adapter/train_loss.png")
PY
