"""LoRA on the frozen LLM (peft), optionally acting only where the LLM reads speech.

The paper trains the adapter alone. A low-rank update of the LLM's projections lets the LLM meet
the speech halfway; `where="speech"` applies it at speech positions only, so every text position's
own computation is the frozen LLM's (it still attends to the adapted speech positions). Text-only
prompts then give exactly the frozen LLM's answers, and a prompt prefix without speech keeps its
cached keys and values (blsp.modeling's shared prefix). `where="voice"` applies it at the voice
channel's vectors only (blsp.voice_channel): the words' positions and the answer are the frozen
LLM's own, and the few voice positions, which attend to the instruction before them, become a
question-aware prefix of the LLM's keys and values, strong enough to answer about the voice, while
every other position's own computation is the frozen LLM's (it attends to the voice positions, as
with `speech`). `where="request"` applies it at every
position of a sequence that holds speech (its answer's tokens too: what a closed question about
the voice needs) and nowhere in one that holds none: text-only prompts still get the frozen LLM.
`where="all"` is plain peft: everywhere, text-only prompts included.

peft injects the LoRA layers into the LLM in place (`inject_adapter_in_model`): the LLM stays the
transformers model it was, `language_model` of `BlspModel`; peft holds, saves and loads the
weights. At speech positions only, `LoraGate` computes the branch itself, on the speech rows alone
(peft's forward would compute it at every position, to be masked: 1.2-1.3x the LLM's training
step on the demo's rows); everywhere, peft computes it, and the gate skips it for the KD teacher
(no gradient) or zeroes it (gradients on).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from torch import nn

from .errors import BlspError

PLACES = ("speech", "voice", "request", "all")
# The projections of every decoder layer in Llama-, Qwen-, Mistral-style LLMs.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # speech: LoRA acts at speech positions only; voice: at the voice channel's positions only;
    # request: everywhere in a sequence holding speech; all: everywhere (plain peft)
    where: str = "speech"
    target_modules: tuple[str, ...] = ATTENTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.where not in PLACES:
            raise BlspError(f"unknown --lora-where {self.where!r}; choose from {', '.join(PLACES)}")
        if self.rank < 1:
            raise BlspError(f"--lora-rank {self.rank}: LoRA needs a rank of at least 1")
        if not 0 <= self.dropout < 1:
            raise BlspError(f"--lora-dropout {self.dropout}: a probability in [0, 1)")
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
    """Where the LoRA branches act, for one forward: everywhere, at speech positions only, or at
    every position of the sequences that hold speech.

    With `speech_only`, a forward over T positions acts where the *last* T flags of the [B, P]
    speech mask are set: a forward over a whole prompt uses all of it; one after a cached text
    prefix (training's shared prefix) or a generation step after the prompt (which always ends in
    text: the assistant header) uses its tail. With `whole_rows`, it acts on all T positions of
    each row whose mask holds any speech (a generation step of a speech request included). Outside
    `positions(...)` no position is speech, so the LLM on text alone is exactly the frozen LLM.
    `disabled()` turns LoRA off everywhere (the KD teacher is the frozen LLM reading the transcript).
    """

    def __init__(self, speech_only: bool, whole_rows: bool = False) -> None:
        self.speech_only = speech_only or whole_rows  # the gate computes the branch on chosen rows
        self.whole_rows = whole_rows
        self.mask: torch.Tensor | None = None
        self.enabled = True
        self._rows: torch.Tensor | None = None  # see rows(): the speech rows of the mask below,
        self._rows_mask: torch.Tensor | None = None  # held (an id() could be reused by a later mask),
        self._rows_key: tuple | None = None  # at this in-place version and forward shape

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
        return self.enabled and (self.whole_rows or not self.speech_only)

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

    def rows(self, shape: torch.Size) -> torch.Tensor | None:
        """The flat indices (into B*T) of the speech positions of a forward whose output is `shape`
        ([B, T, d]); None where nothing is speech. Found once per forward length, not per layer."""
        if not self.enabled or self.mask is None:
            return None
        key = (self.mask._version, tuple(shape[:2]))
        if self._rows_mask is not self.mask or self._rows_key != key:
            flags = self.mask[:, -shape[1]:]
            if self.whole_rows:  # every position of a sequence that holds speech
                flags = self.mask.any(dim=1, keepdim=True).expand(-1, shape[1])
            if flags.shape != shape[:2]:
                raise BlspError(f"speech-position LoRA: a forward over {tuple(shape[:2])} positions does not fit "
                                f"the speech mask {tuple(self.mask.shape)}")
            self._rows, self._rows_mask, self._rows_key = flags.reshape(-1).nonzero()[:, 0], self.mask, key
        return self._rows

    # -- speech positions only: the branch runs on the speech rows alone --------------------------
    def peft_off(self, module: nn.Module, inputs: tuple) -> None:
        # peft's own forward runs the base layer only; `speech_branch` adds LoRA where it acts.
        module._disable_adapters = True

    def speech_branch(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * B(A(dropout(x))) at the speech rows, base(x) elsewhere: the same sum
        as peft's, with the branch's matmuls and element-wise work on the speech rows only (a fifth
        of a training row), where masking peft's output cost 1.2-1.3x the LLM's training step
        (benchmarks/lora_gate.py). With gradients on, the branch runs even on no rows, so every
        LoRA parameter gets a gradient (zero), as on a rank whose gradients are all-reduced."""
        rows = self.rows(output.shape)
        if rows is None or not len(rows):
            if not torch.is_grad_enabled():
                return output
            rows = torch.zeros(0, dtype=torch.long, device=output.device)
        a, b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).index_select(0, rows)
        delta = b(a(module.lora_dropout[ADAPTER_NAME](x.to(a.weight.dtype)))) * module.scaling[ADAPTER_NAME]
        # In place: nothing has read the base layer's output yet, and its backward does not need it.
        output.view(-1, output.shape[-1]).index_add_(0, rows, delta.to(output.dtype))
        return output

    # -- everywhere (plain peft): off for the KD teacher -------------------------------------------
    def skip_when_off(self, module: nn.Module, inputs: tuple) -> None:
        # Nothing to compute when LoRA is off and no gradient is wanted (the KD teacher).
        module._disable_adapters = not self.enabled and not torch.is_grad_enabled()

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # With gradients on, zeroing (not skipping) gives every LoRA parameter a gradient (zero),
        # as on a rank whose gradients are all-reduced.
        return output if self.enabled else output * 0


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
    gate = LoraGate(speech_only=settings.where in ("speech", "voice"), whole_rows=settings.where == "request")
    for module in lora_layers(language_model):
        if not hasattr(module, "_disable_adapters"):  # peft's switch to its base layer alone
            raise BlspError(f"LoRA: this peft version's {type(module).__name__} has no `_disable_adapters` switch; "
                            "install the peft version pyproject.toml names")
        if gate.speech_only:
            if not _plain_linear_lora(module):
                raise BlspError(f"speech-position LoRA computes the branch itself and knows plain linear layers "
                                f"only; {type(module).__name__} over {type(module.base_layer).__name__} is not one "
                                "(a quantised or DoRA layer): use --lora-where all")
            module.register_forward_pre_hook(gate.peft_off)
            module.register_forward_hook(gate.speech_branch)
        else:
            module.register_forward_pre_hook(gate.skip_when_off)
            module.lora_B[ADAPTER_NAME].register_forward_hook(gate.hook)
    return gate


def voice_positions(speech_mask: torch.Tensor, n: int, place: str = "before") -> torch.Tensor:
    """The first (`place` "before") or last ("after") `n` positions of every run of speech slots in
    [B, P] `speech_mask`: where a clip's voice-channel vectors sit beside its words (blsp.modeling)."""
    if place == "after":
        return voice_positions(speech_mask.flip(1), n).flip(1)
    index = torch.arange(speech_mask.shape[1], device=speech_mask.device).expand_as(speech_mask)
    previous = torch.nn.functional.pad(speech_mask[:, :-1], (1, 0), value=False)
    starts = torch.where(speech_mask & ~previous, index, torch.full_like(index, -1))
    return speech_mask & (index - starts.cummax(dim=1).values < n)


def _plain_linear_lora(module: nn.Module) -> bool:
    """A peft LoRA layer whose output is base(x) + scaling * B(A(dropout(x))), nothing more."""
    from peft.tuners.lora.layer import Linear

    return (type(module) is Linear and type(module.base_layer) is nn.Linear and ADAPTER_NAME in module.lora_A
            and not getattr(module, "use_dora", {}).get(ADAPTER_NAME, False)
            and not getattr(module, "lora_variant", {}).get(ADAPTER_NAME))


def _linear_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear) and name}


def set_lora_dropout(language_model: nn.Module, training: bool) -> None:
    """LoRA's dropout follows the model's mode; the frozen LLM around it stays in eval mode."""
    for module in lora_layers(language_model):
        module.lora_dropout.train(training)


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
