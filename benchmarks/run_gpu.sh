#!/usr/bin/env bash
# Every GPU benchmark in one go, for a GPU lent for minutes (README.md here: "On a GPU").
#
#   bash benchmarks/run_gpu.sh [OUTPUT_DIR]        # default benchmarks/results
#   ONLY=train_step bash benchmarks/run_gpu.sh      # just the step-2 benchmark's main run
#
# Needs torch with CUDA, transformers and tokenizers only: the gpu preset builds randomly
# initialised models from configs (Whisper small's encoder, a Llama 3.2 1B-shaped LLM), so no
# hub, packaged weights or audio libraries are needed. Run from the repository root.
set -uo pipefail
out=${1:-benchmarks/results}
only=${ONLY:-}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
$py -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())" || exit 1
status=0
# Step 2 as `blsp train` runs it on a GPU (bf16 autocast, the frozen LLM stored in bf16), against:
# ours on random batches, ours with the adapter's other convolution, ours with the frozen LLM
# checkpointed, the floor (twice) and the original's way (fp32); then a profile of ours.
$py benchmarks/train_step.py --preset gpu --batch-size 32 --steps 20 --unbucketed --other-conv --gradient-checkpointing \
    --profile 3 --output "$out/train_step-gpu.json" || status=1
[ "$only" = train_step ] && exit $status
# What keeping the frozen LLM in bf16 gives: the same step with it in fp32.
$py benchmarks/train_step.py --preset gpu --batch-size 32 --steps 20 --llm-dtype fp32 --no-original \
    --output "$out/train_step-gpu-llm-fp32.json" || status=1
# Inference: first token and tokens/s.
$py benchmarks/generate.py --preset gpu --batch-size 8 --output "$out/generate-gpu.json" || status=1
exit $status
