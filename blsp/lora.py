"""LoRA on the frozen LLM (peft), optionally acting only where the LLM reads speech.

The paper trains the adapter alone. A low-rank update of the LLM's projections lets the LLM meet
the speech halfway; `where="speech"` applies it at speech positions only, so every text position's
own computation is the frozen LLM's (it still attends to the adapted speech positions). Text-only
prompts then give exactly the frozen LLM's answers, and a prompt prefix without speech keeps its
cached keys and values (blsp.modeling's shared prefix).

peft injects the LoRA layers into the LLM in place (`inject_adapter_in_model`): the LLM stays the
transformers model it was, `language_model` of `BlspModel`. Every LoRA branch's output passes a
forward hook on its `lora_B` (`LoraGate`) that scales it by a per-position flag, or by 0 for the KD
teacher.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import BlspError

PLACES = ("speech", "all")
# The projections of every decoder layer in Llama-, Qwen-, Mistral-style LLMs.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    where: str = "speech"  # speech: LoRA acts at speech positions only; all: everywhere (plain peft)
    target_modules: tuple[str, ...] = ATTENTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.where not in PLACES:
            raise BlspError(f"unknown --lora-where {self.where!r}; choose from {', '.join(PLACES)}")
        if self.rank < 1:
            raise BlspError(f"--lora-rank {self.rank}: LoRA needs a rank of at least 1")
        if not self.target_modules:
            raise BlspError("--lora-modules: name at least one projection (e.g. q_proj,v_proj)")

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}


def parse_modules(text: str) -> tuple[str, ...]:
    """`--lora-modules`: comma-separated names, or the groups `attention`, `mlp`, `all`."""
    groups = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        for name in groups.get(part, (part,) if part else ()):
            if name not in names:
                names.append(name)
    return tuple(names)


class LoraGate:
    """Where the LoRA branches act, for one forward: everywhere, or at speech positions only.

    With `speech_only`, a LoRA branch's output [B, T, d] is multiplied by the flags of the *last*
    T positions of the [B, P] speech mask: a forward over a whole prompt uses all of it; one after
    a cached text prefix (training's shared prefix) or a generation step after the prompt (which
    always ends in text: the assistant header) uses its tail. Outside `positions(...)` no position
    is speech, so the LLM on text alone is exactly the frozen LLM. `disabled()` turns LoRA off
    everywhere (the KD teacher is the frozen LLM reading the transcript).
    """

    def __init__(self, speech_only: bool) -> None:
        self.speech_only = speech_only
        self.mask: torch.Tensor | None = None
        self.enabled = True

    @contextlib.contextmanager
    def positions(self, speech_mask: torch.Tensor | None) -> Iterator[None]:
        previous, self.mask = self.mask, speech_mask
        try:
            yield
        finally:
            self.mask = previous

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def acts_on_text(self) -> bool:
        """Whether text positions' keys and values depend on LoRA now (a cached prefix would be stale)."""
        return self.enabled and not self.speech_only

    def state(self) -> tuple:
        return self.mask, self.enabled

    @contextlib.contextmanager
    def restored(self, state: tuple) -> Iterator[None]:
        """As it was at `state()`: a layer recomputed in the backward pass (activation
        checkpointing) must see the positions its forward saw."""
        previous = self.state()
        self.mask, self.enabled = state
        try:
            yield
        finally:
            self.mask, self.enabled = previous

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # Zeroing (not skipping) keeps every LoRA parameter in the graph, as DDP/FSDP expect.
        if not self.enabled or (self.speech_only and self.mask is None):
            return output * 0
        if not self.speech_only:
            return output
        flags = self.mask[:, -output.shape[1]:]
        if flags.shape != output.shape[:2]:
            raise BlspError(f"speech-position LoRA: a forward over {tuple(output.shape[:2])} positions does not fit "
                            f"the speech mask {tuple(self.mask.shape)}")
        return output * flags[..., None].to(output.dtype)


def add_lora(language_model: nn.Module, settings: LoraSettings) -> LoraGate:
    """Inject LoRA layers into `language_model` (trainable; B starts at zero, so the model's
    function is unchanged until trained) and return the gate that says where they act."""
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        raise BlspError(f"--lora-modules: the LLM has no module named {', '.join(missing)} "
                        f"(its linear layers include e.g. {', '.join(sorted(_linear_names(language_model))[:8])})")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    inject_adapter_in_model(config, language_model, adapter_name=ADAPTER_NAME)
    gate = LoraGate(speech_only=settings.where == "speech")
    for module in lora_layers(language_model):
        module.lora_B[ADAPTER_NAME].register_forward_hook(gate.hook)
    return gate


def _linear_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear) and name}


def lora_layers(language_model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in language_model.modules() if isinstance(m, LoraLayer)]


def lora_parameters(language_model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in language_model.named_parameters() if is_lora_name(name)]


def is_lora_name(name: str) -> bool:
    return ".lora_" in name


def lora_state_dict(language_model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights, under peft's adapter-free names (as a PEFT checkpoint stores them)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(language_model, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(language_model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load LoRA weights; returns what the model expected and `state` lacked."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(language_model, state, adapter_name=ADAPTER_NAME)
    return [k for k in result.missing_keys if is_lora_name(k)]
