"""`blsp train --fsdp` on GPUs (NCCL): the same losses, gradients and adapter as without FSDP.

Builds a tiny random Whisper encoder and Llama with an untied output head (from configs: no
network, no downloads), then takes 3 AdamW steps on the adapter twice: with the whole model on
every rank (each rank the whole global batch) and with the LLM sharded by `blsp.fsdp` (each
rank its share of the batch, gradients all-reduced as `Trainer` does), in fp32. Checks the
losses, gradients and adapters agree, that the digest of the sharded frozen LLM is unchanged,
and that a bf16-autocast forward runs. Needs only torch and transformers (no audio libraries:
the encoder features are random), so it runs on a bare GPU machine:

    PYTHONPATH=. HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=1 benchmarks/fsdp_check.py   # one GPU
    PYTHONPATH=. HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=8 benchmarks/fsdp_check.py   # eight
    PYTHONPATH=. HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_check.py --cpu  # gloo

With one GPU the sharding is a group of one, but everything else runs as on many: NCCL, the
FSDP2 hooks, DTensor weights, digests of sharded weights, the prefix cache turned off. (NCCL
refuses two ranks on one GPU, so 2 processes need 2 GPUs; tests/test_distributed.py covers 2
processes on CPU with gloo.) Writes benchmarks/results/fsdp_check.json (rank 0); exit status 1
if the runs differ beyond fp tolerance.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "continue the following text in a coherent and engaging style",
    "please transcribe the following audio into english text",
    "a speech encoder turns audio into frames for the language model",
    "hello world this is a small test of the speech toolkit",
]
LR = 2e-3
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_models(root: Path, layers: int) -> dict[str, str]:
    """A tiny Whisper and a tiny Llama (tied embeddings off, so the output head is sharded too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, WhisperConfig,
                              WhisperForConditionalGeneration)

    torch.manual_seed(0)
    wcfg = WhisperConfig(vocab_size=100, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=2,
                         decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1, decoder_start_token_id=2, begin_suppress_tokens=None, suppress_tokens=None)
    WhisperForConditionalGeneration(wcfg).save_pretrained(root / "whisper")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(root / "llm")
    lcfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.2, tie_word_embeddings=False, bos_token_id=fast.bos_token_id,
                       eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(lcfg).save_pretrained(root / "llm")
    return {"encoder": str(root / "whisper"), "llm": str(root / "llm")}


def batch_examples(model, n: int, seed: int) -> list:
    """n training sequences with random encoder features (no audio: nothing beyond torch and
    transformers is needed), continuation targets, the training prompt."""
    from blsp.processing import Example
    from blsp.prompts import CONTINUATION_INSTRUCTION

    proc, gen = model.processor, torch.Generator().manual_seed(seed)
    d_enc = model.config.encoder_config.d_model
    prompt = proc.speech_prompt(CONTINUATION_INSTRUCTION)
    return [Example(pieces=prompt, features=[torch.randn(20 + 7 * i, d_enc, generator=gen)],
                    target=proc.prompt.target_ids(SENTENCES[i % 5])) for i in range(n)]


def loss_and_grads(model, examples, n_tokens: int, world: int, device) -> float:
    """Backpropagate this rank's share of the global batch's summed CE / n_tokens (as Trainer
    does), all-reduce the adapter's gradients; returns the global loss per token."""
    batch = {k: v.to(device) for k, v in model.processor.collate(examples).items()}
    out = model(**batch)
    (out.loss_sum / n_tokens).backward()
    total = out.loss_sum.detach().reshape(1).double()
    if world > 1:
        dist.all_reduce(total)
        for p in model.adapter.parameters():
            dist.all_reduce(p.grad)
    return float(total) / n_tokens


def main() -> int:
    cpu = "--cpu" in sys.argv  # the same check with gloo on CPU (torchrun --nproc_per_node=2 ... --cpu)
    if not cpu and not torch.cuda.is_available():
        print("fsdp_check: no GPU here; add --cpu to check with gloo on the CPU", file=sys.stderr)
        return 2
    from blsp.modeling import BlspModel
    from blsp.fsdp import digest_across_ranks, ensure_process_group, shard_model

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ensure_process_group(device)
    # Rank 0 makes the models in a temporary directory the others read (one machine).
    root = [tempfile.mkdtemp(prefix="blsp-fsdp-check-") if rank == 0 else None]
    dist.broadcast_object_list(root, device=device if device.type == "cuda" else None)
    root = Path(root[0])
    if rank == 0:
        build_models(root, layers=4)
    dist.barrier()
    dirs = {"encoder": str(root / "whisper"), "llm": str(root / "llm")}

    plain = BlspModel.from_components(dirs["encoder"], dirs["llm"], seed=0).to(device)
    sharded = BlspModel.from_components(dirs["encoder"], dirs["llm"], seed=0)
    shard_model(sharded, device)
    mem = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    frozen_before = digest_across_ranks(sharded.language_model)
    examples = batch_examples(plain, 8, seed=1)
    n_tokens = sum(len(ex.target) for ex in examples)
    opts = [torch.optim.AdamW(m.adapter.parameters(), lr=LR) for m in (plain, sharded)]
    rows = []
    for step in range(3):
        ref = loss_and_grads(plain, examples, n_tokens, 1, device)  # every rank: the whole batch
        got = loss_and_grads(sharded, examples[rank::world], n_tokens, world, device)  # its share
        grads = list(zip(plain.adapter.parameters(), sharded.adapter.parameters()))
        grad_diff = max(float((a.grad - b.grad).abs().max()) for a, b in grads)
        grad_scale = max(float(a.grad.abs().max()) for a, _ in grads)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        rows.append({"step": step + 1, "loss_plain": ref, "loss_fsdp": got, "max_abs_grad_diff": grad_diff,
                     "max_abs_grad": grad_scale})
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(plain.adapter.parameters(), sharded.adapter.parameters()))
    frozen_same = digest_across_ranks(sharded.language_model) == frozen_before
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):  # bf16 runs too
        batch = {k: v.to(device) for k, v in sharded.processor.collate(examples[rank::world]).items()}
        bf16_loss = float(sharded(**batch).loss)
    # Step 1's gradients must agree to fp rounding; later, Adam turns rounding noise in near-zero
    # gradients into updates of up to lr, so the adapters are compared at a fifth of lr.
    ok = (frozen_same and weight_diff <= 0.2 * LR and math.isfinite(bf16_loss)
          and rows[0]["max_abs_grad_diff"] <= 1e-4 * rows[0]["max_abs_grad"]
          and all(abs(r["loss_plain"] - r["loss_fsdp"]) <= 1e-4 * abs(r["loss_plain"]) for r in rows))
    result = {"ok": ok, "world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "steps": rows, "max_abs_adapter_diff": weight_diff,
              "frozen_llm_unchanged": frozen_same, "bf16_loss_fsdp": bf16_loss,
              "gpu_mb_allocated_after_sharding": round(mem, 1)}
    if rank == 0:
        print(json.dumps(result, indent=2))
        out = Path(os.environ.get("FSDP_CHECK_OUT", "benchmarks/results/fsdp_check.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
