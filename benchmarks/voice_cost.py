#!/usr/bin/env python
"""What the voice channel costs: step 2 with it against without, and time to first token against the cascade.

    PYTHONPATH=. python benchmarks/voice_cost.py --manifest runs/demo-voice/data/test.jsonl
    PYTHONPATH=. python benchmarks/voice_cost.py --manifest M --clips 24 --steps 20 --voice-vectors 4 \
        --voice-attributes all --lora-rank 8 --lora-where voice --voice-gate   # the voice demo's model

All in this process, on the packaged Whisper-base and SmolLM2-135M-Instruct, the default preset's
model (Whisper's decoder states through the token bridge), built twice: without a voice channel
and with the channel (`--voice-attributes`, `--voice-vectors`: blsp/voice_channel.py; with
`--lora-rank` also LoRA, `--lora-where` as the voice demo trains it; with `--voice-gate` the gate
that reads the voice vectors only under a question about the voice, fitted as step 2 fits it:
blsp/voice_gate.py; the continuation's request then closes it). Measured
alternately, A then B then A..., so a noisy machine slows both alike:

- step 2, encoding: the features of every clip (Whisper's encoder and greedy decoder, plus the
  voice statistics with the channel): seconds a clip.
- step 2, training: forward, backward and an AdamW step on batches of `--batch-size` clips with a
  20-token continuation target (the demo's): seconds a step.
- serving, time to first token on one clip at a time: BLSP (the audio to the first answer token:
  log-mel, encoding, the prompt's forward, one token) against the cascade (Whisper's greedy
  transcript on its 30 s window, then the same LLM reading it, one token).

Prints each median and the ratios (bars of issue 27: step 2 at most 1.3x without the channel;
time to first token at most 1.2x the cascade's) and writes benchmarks/results/voice_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blsp.data import load_utterance_audio, read_manifest
from blsp.features import encode_waveforms
from blsp.lora import LoraSettings
from blsp.modeling import BlspModel
from blsp.options import voice_attribute_names
from blsp.processing import Example
from blsp.prompts import CONTINUATION_INSTRUCTION, task_instruction
from blsp.voice_gate import labelled_requests, prompt_prefix
from blsp.whisper import load_whisper, load_whisper_tokenizer, transcribe

TARGET = "and so the story goes on, one more time, as it always has and always will."  # ~20 tokens


def build(encoder: str, llm: str, voice_vectors: int = 0, voice_attributes: tuple[str, ...] = (),
          lora_rank: int = 0, lora_where: str = "request", voice_gate: bool = False) -> BlspModel:
    model = BlspModel.from_components(encoder, llm, adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", speech_vectors="tokens", voice_vectors=voice_vectors,
                                      voice_attributes=voice_attributes, voice_gate=voice_gate)
    if lora_rank:
        model.enable_lora(LoraSettings(rank=lora_rank, where=lora_where))
    if voice_gate:  # fitted as step 2 fits it, on the requests every gate knows (blsp.voice_gate)
        model.fit_voice_gate({prompt_prefix(model.processor.speech_prompt(text)): about
                              for text, about in labelled_requests(CONTINUATION_INSTRUCTION)})
    return model.eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step(model: BlspModel, optimizer, features: list[torch.Tensor], batch_size: int, step: int) -> None:
    proc = model.processor
    rows = [features[(step * batch_size + i) % len(features)] for i in range(batch_size)]
    prompt = proc.speech_prompt(CONTINUATION_INSTRUCTION)
    batch = proc.collate([Example(prompt, [f], proc.prompt.target_ids(TARGET)) for f in rows])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def blsp_first_token(model: BlspModel, wav) -> str:
    return model.generate(audio=wav, instruction=task_instruction("continue"), max_new_tokens=1)[0]


@torch.no_grad()
def cascade_first_token(whisper, whisper_tokenizer, model: BlspModel, wav) -> str:
    from blsp.inference import generate_from_examples

    text = transcribe(whisper, whisper_tokenizer, [wav])[0]
    prompt = model.processor.transcript_prompt(task_instruction("continue"), text)
    return generate_from_examples(model, [Example(prompt)], max_new_tokens=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="clips to measure on (a manifest of audio + text)")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--voice-vectors", type=int, default=4)
    parser.add_argument("--voice-attributes", default="all", help="comma-separated, all, or none")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA on the voice model; 0: none")
    parser.add_argument("--lora-where", default="request", help="where that LoRA acts (blsp train --lora-where)")
    parser.add_argument("--voice-gate", action="store_true", help="the voice model reads its channel only under "
                        "questions about the voice (blsp train --voice-gate)")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "voice_cost.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    utts = read_manifest(args.manifest).utterances[: args.clips]
    waves = [load_utterance_audio(u) for u in utts]
    attributes = voice_attribute_names("" if args.voice_attributes == "none" else args.voice_attributes)
    models = {"words": build(args.encoder, args.llm),
              "voice": build(args.encoder, args.llm, args.voice_vectors, attributes, args.lora_rank, args.lora_where,
                             args.voice_gate)}
    whisper = load_whisper(args.encoder)
    whisper_tokenizer = load_whisper_tokenizer(args.encoder)

    # step 2: encoding (once per clip and model, alternately) and training steps (alternately)
    encode_s = {name: 0.0 for name in models}
    features = {name: [] for name in models}
    for wav in waves:
        for name, model in models.items():
            start = time.perf_counter()
            features[name] += encode_waveforms(model, [wav])
            encode_s[name] += time.perf_counter() - start
    optimizers = {name: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for name, m in models.items()}
    step_s = {name: [] for name in models}
    for name, model in models.items():  # one warm-up step each (allocations, kernels)
        train_step(model, optimizers[name], features[name], args.batch_size, 0)
    for step in range(args.steps):
        for name, model in models.items():
            step_s[name].append(timed(lambda: train_step(model, optimizers[name], features[name], args.batch_size,
                                                         step + 1)))

    # serving: time to first token, one clip at a time, BLSP (each model) and the cascade alternately
    ttft = {"words": [], "voice": [], "cascade": []}
    blsp_first_token(models["voice"], waves[0])  # warm-up
    cascade_first_token(whisper, whisper_tokenizer, models["words"], waves[0])
    for wav in waves:
        ttft["words"].append(timed(lambda: blsp_first_token(models["words"], wav)))
        ttft["voice"].append(timed(lambda: blsp_first_token(models["voice"], wav)))
        ttft["cascade"].append(timed(lambda: cascade_first_token(whisper, whisper_tokenizer, models["words"], wav)))

    med = statistics.median
    step2 = {name: encode_s[name] / len(waves) * args.batch_size + med(step_s[name]) for name in models}
    result = {
        "clips": len(waves), "steps": args.steps, "batch_size": args.batch_size, "voice_vectors": args.voice_vectors,
        "voice_attributes": list(attributes), "lora_rank": args.lora_rank,
        "lora_where": args.lora_where if args.lora_rank else None, "voice_gate": args.voice_gate,
        "encode_s_per_clip": {k: v / len(waves) for k, v in encode_s.items()},
        "train_step_s_median": {k: med(v) for k, v in step_s.items()},
        # a step's clips encoded once (the feature cache) plus the step: what a step-2 epoch costs a step
        "step2_s_per_step": step2,
        "step2_ratio_voice_over_words": step2["voice"] / step2["words"],
        "ttft_s_median": {k: med(v) for k, v in ttft.items()},
        "ttft_ratio_voice_over_cascade": med(ttft["voice"]) / med(ttft["cascade"]),
        "ttft_ratio_words_over_cascade": med(ttft["words"]) / med(ttft["cascade"]),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    print(f"step 2 with the voice channel / without: {result['step2_ratio_voice_over_words']:.2f}x "
          f"(encoding {result['encode_s_per_clip']['voice']:.2f} vs {result['encode_s_per_clip']['words']:.2f} s a "
          f"clip; a step {result['train_step_s_median']['voice']:.2f} vs {result['train_step_s_median']['words']:.2f} s)")
    print(f"time to first token: BLSP with voice {med(ttft['voice']):.2f} s, words only {med(ttft['words']):.2f} s, "
          f"cascade {med(ttft['cascade']):.2f} s: {result['ttft_ratio_voice_over_cascade']:.2f}x the cascade's")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
