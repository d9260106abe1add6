"""The frozen causal LLM: loading it, running it on spliced embeddings, and reusing a shared prefix.

Everything here treats the LLM as a Hugging Face causal LM (`get_decoder()`, its layers, its
input and output embeddings); nothing knows about speech except that positions come from the
attention mask, so that padded or dropped speech slots take no position.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import BlspError
from .processing import IGNORE_INDEX, SPEECH_TOKEN_ID

PREFIX_CACHE_SIZE = 4  # shared prompt prefixes whose keys and values are kept (see PrefixCache)


def load_language_model(name: str, torch_dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer, with an explicit pad id (Llama-2's tokenizer has none)."""
    from .packaged import resolve

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise BlspError(f"cannot load the LLM {name!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.eval(), tokenizer


def token_embeddings(language_model: PreTrainedModel) -> torch.Tensor:
    """The vectors the LLM reads for its tokens [vocab, d_llm]: its embedding matrix, times the
    scale some LLMs apply in the embedding's forward (Gemma: sqrt(hidden size), 25.3 for Gemma 3
    270M). Everything the LLM reads in a token's place (the token bridge's rows, the CTC head's,
    the adapter's and voice channel's starting scale) must be on that scale: read off the bare
    matrix, Gemma got speech vectors 25 times too small (the multilingual demo closed 13% of the
    gap). The matrix itself, no copy, where the scale is 1 (Llama, SmolLM2, Qwen2)."""
    embed = language_model.get_input_embeddings()
    scale = getattr(embed, "embed_scale", None)
    scale = float(scale) if scale is not None else 1.0
    return embed.weight if scale == 1.0 else embed.weight.detach() * scale


def attention_kernels():
    """Scaled-dot-product attention without cuDNN's kernel (it only exists on a GPU).

    cuDNN's attention builds an execution plan for every new shape, ~5 ms of CPU time in the
    forward and again in the backward of each layer (measured on an H100, torch 2.11): step 2's
    batches change length every step, so a 1B LLM's step took 0.36 s where the same work with a
    cached plan took 0.13 s. Flash and memory-efficient attention need no plan.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from the mask: padding and hidden speech slots take none."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> list[int]:
    """The token ids every row of a right-padded batch opens with, up to the first speech slot
    and, given `labels`, short of the first position whose hidden state predicts one (a prefix's
    hidden states are not computed): a batch of one text-only row is not all prefix."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0) & (input_ids[0] != SPEECH_TOKEN_ID)
    if labels is not None:
        same[:-1] &= (labels[:, 1:] == IGNORE_INDEX).all(0)
        same[-1] = False
    n = int(same.long().cumprod(0).sum())
    return input_ids[0, :n].tolist()


def lm_logits(language_model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = language_model.get_output_embeddings()(hidden)
    cap = getattr(language_model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def target_logits(language_model: PreTrainedModel, hidden: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only where a next token is scored ([N, V]) and those tokens ([N]).

    Projecting only the target positions onto the vocabulary saves most of the memory and
    time of the LM head (the continuation is a fraction of the sequence).
    """
    shift_labels = labels[:, 1:]
    where = shift_labels != IGNORE_INDEX
    return lm_logits(language_model, hidden[:, :-1][where]), shift_labels[where]


# ----------------------------------------------------------------------------------------------
# The shared-prefix KV cache
# ----------------------------------------------------------------------------------------------
try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # an older transformers: the prefix cache then keeps its own layers
    DynamicLayer = None

if DynamicLayer is None:
    ReadOnlyKV = type(None)  # matches no cache layer
else:

    class ReadOnlyKV(DynamicLayer):
        """A layer of the shared-prefix cache that returns prefix + new keys without storing them.

        Nothing reads the cache after a training forward, and a layer recomputed under
        activation checkpointing must not append its keys a second time."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache:
    """Keys and values of the few prompt prefixes that open every row of a batch.

    The frozen LLM's keys and values of a prefix never change (a prefix holds no speech), so each
    is computed once and handed out, expanded to the batch, as a read-only cache.
    """

    def __init__(self, size: int = PREFIX_CACHE_SIZE):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()

    def get(self, language_model: PreTrainedModel, prefix: tuple[int, ...], batch: int, dtype: torch.dtype,
            frozen: Callable[[], contextlib.AbstractContextManager]):
        """A fresh KV cache holding `prefix` for `batch` rows; `frozen()`: a context in which the
        LLM is the frozen one (LoRA off)."""
        from transformers import DynamicCache

        device = language_model.device
        key = (prefix, dtype, device, torch.is_autocast_enabled(device.type))
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            # A few prefixes in turn are common: the alignment report's three prompts batch after
            # batch, training batches with and without transcription rows. Recomputing on each
            # switch cost the demo's evaluation 14 s of its 93; ~2 MB a prefix for SmolLM2, so keep four.
            while len(self.entries) >= self.size:
                self.entries.popitem(last=False)
            ids = torch.tensor([prefix], device=device)
            with torch.no_grad(), frozen():
                out = language_model.get_decoder()(
                    inputs_embeds=language_model.get_input_embeddings()(ids).to(dtype), use_cache=True)
            self.entries[key] = [(layer.keys, layer.values) for layer in cache_of(out).layers]
        cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                             for k, v in self.entries[key]], config=language_model.config)
        for layer in cache.layers:
            if DynamicLayer is not None and type(layer) is DynamicLayer:
                layer.__class__ = ReadOnlyKV
        return cache


def cache_argument(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword a forward takes its KV cache by: transformers 5 renamed `past_key_values` to
    `cache` (the old name still works there, with a FutureWarning at every call)."""
    return {_cache_keyword(type(module)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(module_class: type) -> str:
    # Asked once per class (greedy decoding asks at every token). The class's forward, not the
    # instance's, which a hook or a test may have wrapped in *args, **kwargs.
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned, under either name (cache_argument)."""
    return out.cache if "cache" in out else out.past_key_values


def run_decoder(language_model: PreTrainedModel, embeds: torch.Tensor, attention_mask: torch.Tensor,
                prefix_cache: PrefixCache | None = None, shared_prefix: Sequence[int] = (),
                frozen: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """The LLM's last hidden states over `embeds`; positions come from the mask.

    `shared_prefix`: token ids that open every row (right padding: the system prompt and the
    instruction before the speech), whose keys and values come from `prefix_cache`; the hidden
    states returned at those positions are zeros (no target is ever scored there).
    """
    position_ids = mask_positions(attention_mask)
    base = language_model.get_decoder()
    n = len(shared_prefix)
    if not n:
        # use_cache=False: no KV cache to build (nothing reads it after a training forward).
        return base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state
    cache = prefix_cache.get(language_model, tuple(shared_prefix), embeds.shape[0], embeds.dtype, frozen)
    if any("forward" in vars(layer) for layer in base.layers) and not all(
            isinstance(layer, ReadOnlyKV) for layer in cache.layers):
        # Checkpointed layers would append to a writable cache twice: go without the prefix.
        return run_decoder(language_model, embeds, attention_mask)
    rest = base(inputs_embeds=embeds[:, n:], attention_mask=attention_mask, position_ids=position_ids[:, n:],
                use_cache=True, **cache_argument(base, cache)).last_hidden_state
    return torch.cat([rest.new_zeros(rest.shape[0], n, rest.shape[2]), rest], dim=1)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing of the frozen layers
# ----------------------------------------------------------------------------------------------
def set_layer_checkpointing(language_model: PreTrainedModel, enabled: bool,
                            recompute_context: Callable[[], Callable[[], contextlib.AbstractContextManager]]) -> None:
    """Recompute each frozen LLM layer in the backward pass instead of keeping its activations.

    Not transformers' `gradient_checkpointing_enable`: that one acts only in train mode (the
    frozen LLM stays in eval mode, so dropout stays off) and drops a passed KV cache, which
    would silently cut the shared prefix off. Here each decoder layer's forward is wrapped in
    a non-reentrant `torch.utils.checkpoint`, whatever the mode; the prefix cache is read-only
    (`ReadOnlyKV`), so the recomputation sees exactly what the forward saw.
    `recompute_context()`, called in the forward, returns the context the recomputation must run
    in (what the forward's context set: attention kernels, LoRA's speech positions).
    """
    for layer in language_model.get_decoder().layers:
        if enabled and "forward" not in vars(layer):
            layer.forward = _checkpointed(layer.forward, recompute_context)
        elif not enabled and "forward" in vars(layer):
            del layer.forward


def _checkpointed(forward, recompute_context):
    """`forward` under a non-reentrant activation checkpoint whenever a graph is being built."""

    def run(*args: Any, **kwargs: Any):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recomputation runs in the backward pass, outside the forward's context: restore it.
        context = recompute_context()
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs,
                                                 context_fn=lambda: (contextlib.nullcontext(), context()))

    return run
