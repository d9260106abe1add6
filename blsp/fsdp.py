"""`blsp train --fsdp`: the frozen LLM's weights sharded across ranks with PyTorch FSDP2.

Why: an LLM too large for one GPU's memory still fits when each of N ranks holds 1/N of its
decoder layers; FSDP2 (`fully_shard`) all-gathers a layer's weights just before it runs and frees
them after. Only the frozen LLM is sharded. The adapter (and CTC head) stays replicated with its
gradients all-reduced as without `--fsdp` (it is a few MB), and the Whisper encoder stays whole
on every rank, because each rank encodes a different number of clips while it fills the feature
cache, and a sharded module would need every rank in every forward.

What is sharded: each decoder layer is its own FSDP group, then the decoder (its final norm) is
the root; an untied output head is a group of its own. The input embedding matrix (and so a tied
output head) stays replicated: BlspModel reads it directly (splicing speech into the prompt, the
CTC head's rows, the warm start), and it is a small share of a large LLM's weights.

Every rank must then run the same sequence of LLM forwards (each all-gathers), so the trainer
turns off the prefix KV cache under `--fsdp` (a rank whose cache misses would run one more
forward than the others) and runs equally many micro-batches on every rank.

Works on CPU with gloo as on GPU with NCCL (tests/test_distributed.py runs it with 2 CPU
processes); with one process it still runs through FSDP (a group of one), which is how
`benchmarks/fsdp_check.py` exercises it on a single GPU.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .errors import BlspError


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process; torchrun's or a local one of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # a plain `python -m blsp.cli train --fsdp`: a group of one needs no rendezvous
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (Llama, Qwen, Mistral, Gemma, GPT-2 ...)."""
    decoder = language_model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    raise BlspError(f"--fsdp: cannot find the decoder layers of {type(language_model).__name__} "
                    "(looked for .layers, .h, .blocks on its decoder)")


def shard_model(model, device: torch.device) -> None:
    """Shard `model.language_model` in place across the default process group (FSDP2), and put
    the whole model on `device`: 1/world of each decoder layer per rank, the rest whole.

    Call it on a model still on the CPU: `fully_shard` moves one layer at a time to the device
    and keeps only this rank's shard of it there, so the whole LLM never has to fit on one GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    lm = model.language_model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    embeddings = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    keep_whole = set(embeddings.parameters())
    tied = head is not None and any(p is embeddings.weight for p in head.parameters())
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh)
    # BlspModel calls the decoder and the output head directly (never lm.forward), so each is a
    # root of its own: FSDP's hooks fire on the module that is called.
    fully_shard(lm.get_decoder(), mesh=mesh, ignored_params=keep_whole)
    if head is not None and not tied:
        fully_shard(head, mesh=mesh)
    # Not `model.to(device)`: that would visit the sharded weights too; they are placed already.
    embeddings.to(device)
    for part in (model.speech_source, model.adapter, model.speech_reader):
        part.to(device)
    model.sharded = True
    if dist.get_rank() == 0:
        print(f"fsdp: {len(decoder_layers(lm))} decoder layers of the LLM sharded across {dist.get_world_size()} "
              f"rank(s) on {device.type}", file=sys.stderr)


def is_sharded(model) -> bool:
    return bool(getattr(model, "sharded", False))


def local_digest(module: nn.Module) -> str:
    """SHA-256 of every weight byte this rank holds: the local shard of a sharded (DTensor)
    weight, the whole of any other. Sharding is fixed for a run, so digests taken before and
    after training compare the same bytes on each rank."""
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, DTensor):
            t = t.to_local()
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest_across_ranks(module: nn.Module) -> str:
    """One digest of the module's weights on all ranks (each hashes its shards), the same on
    every rank, so a change anywhere makes every rank stop together instead of one hanging."""
    digest = local_digest(module)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return digest
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return hashlib.sha256("".join(map(str, gathered)).encode()).hexdigest()
