"""LoRA on the LLM: trained beside the adapter, saved with it, and with `where="speech"` acting at
speech positions only (text-only prompts keep the frozen LLM's answers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blsp.errors import BlspError
from blsp.lora import LoraSettings, parse_modules
from blsp.modeling import BlspModel
from blsp.processing import SPEECH_TOKEN_ID
from blsp.processing import Example
from blsp.training import run_train

from conftest import write_corpus
from test_training import options


def _randomise_lora(model: BlspModel | torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (LoRA changes nothing until trained): give every LoRA weight a value (in a
    BlspModel's LLM, or in any module LoRA was put on)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in getattr(model, "language_model", model).named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _speech_batch(model: BlspModel, seconds: float = 1.0):
    feats = torch.randn(int(seconds * 50), model.config.encoder_config.d_model)
    prompt = model.processor.speech_prompt("Continue the following text.")
    target = model.processor.prompt.target_ids("the quick brown fox", False)
    return model.processor.collate([Example(pieces=prompt, features=[feats], target=target)])


def _text_batch(model: BlspModel):
    prompt = model.processor.transcript_prompt("Continue the following text.", "hello world")
    return model.processor.collate([Example(pieces=prompt, target=model.processor.prompt.target_ids("the fox", False))])


def _logits(model: BlspModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, return_logits=True).logits


def test_parse_modules_expands_groups_and_keeps_names():
    assert parse_modules("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert parse_modules("q_proj, mlp") == ("q_proj", "gate_proj", "up_proj", "down_proj")
    with pytest.raises(BlspError, match="--lora-where"):
        LoraSettings(where="text")
    with pytest.raises(BlspError, match="--lora-dropout"):
        LoraSettings(dropout=1.0)


def test_speech_only_lora_leaves_text_prompts_exactly_as_the_frozen_llm(tiny_model):
    text, speech = _text_batch(tiny_model), _speech_batch(tiny_model)
    text_before, speech_before = _logits(tiny_model, text), _logits(tiny_model, speech)
    tiny_model.enable_lora(LoraSettings(rank=4, where="speech"))
    torch.testing.assert_close(_logits(tiny_model, speech), speech_before)  # B = 0: nothing changes yet
    _randomise_lora(tiny_model)
    assert torch.equal(_logits(tiny_model, text), text_before)  # bit-identical on text alone
    after = _logits(tiny_model, speech)
    is_speech = speech["input_ids"][0] == SPEECH_TOKEN_ID
    first_speech = int(is_speech.nonzero()[0])
    # Positions before the speech are untouched; the speech and everything after it changed.
    torch.testing.assert_close(after[0, :first_speech], speech_before[0, :first_speech])
    assert not torch.allclose(after[0, first_speech:], speech_before[0, first_speech:], atol=1e-4)


def test_lora_everywhere_changes_text_prompts_and_can_be_turned_off(tiny_model):
    text = _text_batch(tiny_model)
    before = _logits(tiny_model, text)
    tiny_model.enable_lora(LoraSettings(rank=4, where="all", target_modules=parse_modules("all")))
    _randomise_lora(tiny_model)
    assert not torch.allclose(_logits(tiny_model, text), before, atol=1e-4)
    with tiny_model.lora_off():  # the KD teacher and eval's text conditions: the frozen LLM
        assert torch.equal(_logits(tiny_model, text), before)


def test_request_lora_acts_on_every_position_of_a_speech_prompt_and_never_on_text(tiny_model):
    """`where="request"`: a prompt that holds speech is changed from its first position on and
    generates other tokens; a text-only prompt is bit-identical to the frozen LLM, even batched
    beside a speech prompt (the gate chooses rows, not positions)."""
    from blsp.lora import ADAPTER_NAME, lora_layers

    text, speech = _text_batch(tiny_model), _speech_batch(tiny_model)
    text_before, speech_before = _logits(tiny_model, text), _logits(tiny_model, speech)
    tiny_model.enable_lora(LoraSettings(rank=4, where="request"))
    _randomise_lora(tiny_model)
    assert torch.equal(_logits(tiny_model, text), text_before)
    after = _logits(tiny_model, speech)
    assert not torch.allclose(after[0, :3], speech_before[0, :3], atol=1e-4)  # before the speech too
    assert tiny_model.lora_gate.acts_on_text  # a cached text prefix would go stale
    layer = lora_layers(tiny_model.language_model)[0]
    x = torch.randn(2, 5, layer.in_features)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2] = True  # row 0 holds speech (outside the 5 positions this forward sees), row 1 none
    a, b, scaling = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME], layer.scaling[ADAPTER_NAME]
    with torch.no_grad(), tiny_model.lora_gate.positions(mask):
        out = layer(x)
        torch.testing.assert_close(out[0], layer.base_layer(x[0]) + b(a(x[0])) * scaling)
        torch.testing.assert_close(out[1], layer.base_layer(x)[1], rtol=0, atol=0)


def test_speech_only_lora_adds_peft_s_branch_at_the_speech_rows_alone(tiny_model):
    """The gate computes the branch on the speech rows only: base(x) + scaling * B(A(x)) there,
    base(x) elsewhere; gradients reach LoRA from those rows alone; with gradients on and no speech
    every LoRA weight still gets one (zero), as DDP expects."""
    from blsp.lora import ADAPTER_NAME, lora_layers

    tiny_model.enable_lora(LoraSettings(rank=4, where="speech"))
    _randomise_lora(tiny_model)
    layer = lora_layers(tiny_model.language_model)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, layer.in_features, generator=gen)
    speech = torch.zeros(2, 9, dtype=torch.bool)  # a 9-position prompt; the forward sees its last 7
    speech[0, 4:7] = speech[1, 6:9] = True
    a, b, scaling = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME], layer.scaling[ADAPTER_NAME]
    with torch.no_grad():
        expected = layer.base_layer(x) + speech[:, 2:, None] * b(a(x)) * scaling
    with tiny_model.lora_gate.positions(speech):
        out = layer(x)
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    # A's gradient is the sum over the speech rows only: recompute it from those rows by hand.
    rows = x[speech[:, 2:]]
    by_hand = torch.autograd.grad((layer.base_layer(rows) + b(a(rows)) * scaling).pow(2).sum(), a.weight)[0]
    torch.testing.assert_close(a.weight.grad, by_hand)
    a.weight.grad = None
    layer(x).sum().backward()  # no speech, gradients on: zero, not missing
    assert a.weight.grad is not None and not a.weight.grad.any()
    with torch.no_grad(), tiny_model.lora_gate.positions(torch.zeros(2, 7, dtype=torch.bool)):
        assert torch.equal(layer(x), layer.base_layer(x))  # nothing computed, the base layer's output


def test_lora_dropout_acts_while_training_only_and_never_on_text(tiny_model):
    text, speech = _text_batch(tiny_model), _speech_batch(tiny_model)
    text_before = _logits(tiny_model, text)
    tiny_model.enable_lora(LoraSettings(rank=4, where="speech", dropout=0.5))
    _randomise_lora(tiny_model)
    tiny_model.eval()
    assert torch.equal(_logits(tiny_model, speech), _logits(tiny_model, speech))  # no dropout
    tiny_model.train()
    assert not tiny_model.language_model.training  # the frozen LLM itself stays in eval mode
    torch.manual_seed(0)
    first = _logits(tiny_model, speech)
    torch.manual_seed(1)
    assert not torch.allclose(_logits(tiny_model, speech), first)  # LoRA's input dropped at random
    assert torch.equal(_logits(tiny_model, text), text_before)  # text: the frozen LLM's, training or not


@pytest.mark.parametrize("where", ["speech", "all"])
def test_the_shared_prefix_and_checkpointing_give_the_full_forwards_gradients(tiny_model, where):
    """The cached text prefix is the frozen LLM's: valid for speech-only LoRA, recomputed when
    LoRA acts on text; a checkpointed layer is recomputed under the positions its forward saw."""
    from blsp.llm import shared_prefix

    tiny_model.enable_lora(LoraSettings(rank=4, where=where))
    _randomise_lora(tiny_model)
    batch = _speech_batch(tiny_model)
    params = tiny_model.trainable_parameters()
    grads = []
    for prefix, checkpointing in (((), False), (shared_prefix(batch["input_ids"], batch["attention_mask"]), True)):
        tiny_model.set_llm_checkpointing(checkpointing)
        tiny_model.zero_grad()
        loss = tiny_model(**batch, shared_prefix=prefix).loss
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    lora_grads = [g for g, (n, _) in zip(grads[0], [(n, p) for n, p in tiny_model.named_parameters() if p.requires_grad])
                  if ".lora_" in n]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # prefix cached or not: fp noise


def test_training_with_lora_saves_it_and_loading_gives_the_same_model(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    out = tmp_path / "run"
    run_train([data], out, options(tiny_dirs, tmp_path, max_steps=4, lr=1e-2, lora_rank=4, lora_modules="q_proj,v_proj"))
    weights = load_file(str(out / "adapter.safetensors"))
    lora = {k: v for k, v in weights.items() if k.startswith("lora.")}
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)  # B moved off zero
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["lora"]["where"] == "speech"

    loaded = BlspModel.from_pretrained(out)  # the LLM's fingerprint is its own weights', LoRA apart
    again = loaded.trainable_state_dict()
    for k, v in lora.items():
        torch.testing.assert_close(again[k], v)
    text = _text_batch(loaded)
    plain = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"])
    assert torch.equal(_logits(loaded, text), _logits(plain, text))


def test_lora_is_refused_with_fsdp_and_unknown_modules_name_the_llms_layers(tiny_dirs, tmp_path, tiny_model):
    with pytest.raises(BlspError, match="--fsdp"):
        options(tiny_dirs, tmp_path, lora_rank=4, fsdp=True)
    with pytest.raises(BlspError, match="no module named c_attn"):
        tiny_model.enable_lora(LoraSettings(rank=2, target_modules=("c_attn",)))


def test_lora_lr_gives_lora_its_own_rate_and_needs_lora(tiny_dirs, tmp_path, tiny_model):
    from blsp.trainer import parameter_groups

    tiny_model.enable_lora(LoraSettings(rank=2))
    groups = parameter_groups(tiny_model, options(tiny_dirs, tmp_path, lr=1e-3, lora_rank=2, lora_lr=5e-3))
    assert len(groups) == 2 and groups[1]["lr"] == 5e-3 and "lr" not in groups[0]
    lora_ids = {id(p) for n, p in tiny_model.language_model.named_parameters() if ".lora_" in n}
    assert {id(p) for p in groups[1]["params"]} == lora_ids
    assert not lora_ids & {id(p) for p in groups[0]["params"]}  # the adapter and head: the default rate
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(tiny_model.trainable_parameters())
    one = parameter_groups(tiny_model, options(tiny_dirs, tmp_path, lora_rank=2))
    assert len(one) == 1
    with pytest.raises(BlspError, match="--lora-lr"):
        options(tiny_dirs, tmp_path, lora_lr=1e-3)  # no LoRA to give it to


def test_speech_only_lora_on_a_biased_layer_and_under_bf16_autocast_matches_the_branch_by_hand():
    """Qwen-style projections have a bias (the base layer's output is then a view autograd must
    follow through the in-place add); training on a GPU runs under bf16 autocast."""
    from torch import nn

    from blsp.lora import ADAPTER_NAME, add_lora

    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(6, 5, bias=True)

    model = Projection().requires_grad_(False)
    gate = add_lora(model, LoraSettings(rank=2, where="speech", target_modules=("q_proj",)))
    _randomise_lora(model)
    layer = model.q_proj
    a, b, scaling = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME], layer.scaling[ADAPTER_NAME]
    speech = torch.tensor([[False, True, True, False], [True, False, False, False]])
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(2))
    for autocast, tol in ((False, {}), (True, {"rtol": 2e-2, "atol": 2e-2})):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            with gate.positions(speech):
                out = layer(xs)
            expected = layer.base_layer(xr) + speech[..., None] * b(a(xr)) * scaling
        torch.testing.assert_close(out.float(), expected.float(), **tol)
        out.float().pow(2).sum().backward()
        expected.float().pow(2).sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, **tol)


def test_speech_only_lora_refuses_layers_it_cannot_compute_itself():
    from torch import nn

    from blsp.lora import add_lora

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Embedding(10, 4)

    with pytest.raises(BlspError, match="--lora-where all"):
        add_lora(Embedded(), LoraSettings(rank=2, where="speech", target_modules=("q_proj",)))


def test_request_lora_acts_on_every_generated_token_of_a_speech_request(tiny_model):
    """Our greedy loop (rows dropped as they end) and transformers' generate (the whole prompt's
    mask in scope) give the same tokens under `where="request"`: LoRA stays on for the answer's
    tokens of a speech request, a text request beside it stays the frozen LLM's."""
    from blsp.inference import generate_from_examples

    tiny_model.enable_lora(LoraSettings(rank=4, where="request"))
    _randomise_lora(tiny_model, seed=3)
    proc = tiny_model.processor
    feats = torch.randn(40, tiny_model.config.encoder_config.d_model)
    examples = [Example(pieces=proc.speech_prompt("Continue the following text."), features=[feats]),
                Example(pieces=proc.transcript_prompt("Continue the following text.", "hello world"))]
    ours = generate_from_examples(tiny_model, examples, max_new_tokens=8)
    theirs = generate_from_examples(tiny_model, examples, max_new_tokens=8, repetition_penalty=1.0)
    assert ours == theirs
    with tiny_model.lora_off():
        frozen = generate_from_examples(tiny_model, examples, max_new_tokens=8)
    assert ours[0] != frozen[0] and ours[1] == frozen[1]
