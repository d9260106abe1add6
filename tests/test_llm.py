"""The LLM side (blsp.llm): the shared-prefix KV cache and layer checkpointing give the full forward's numbers."""

from __future__ import annotations

import pytest
import torch

from blsp.llm import shared_prefix
from blsp.processing import IGNORE_INDEX, SPEECH_TOKEN_ID

from conftest import compressing_model, make_examples


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "ctc-compressed"])
def test_a_cached_shared_prefix_gives_the_same_loss_and_gradients(tiny_model, compress):
    model = compressing_model(tiny_model) if compress else tiny_model
    batch = model.processor.collate(make_examples(model))
    prefix = shared_prefix(batch["input_ids"], batch["attention_mask"])
    first_slot = int((batch["input_ids"][0] == SPEECH_TOKEN_ID).nonzero()[0])
    assert 0 < len(prefix) <= first_slot
    results = []
    for use_prefix in (False, True, True):  # the third call reuses the stored keys and values
        model.zero_grad(set_to_none=True)
        out = model(**batch, shared_prefix=prefix if use_prefix else ())
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.adapter.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_prompts_taking_turns_keep_their_prefixes_cached(tiny_model, monkeypatch):
    """The alignment report's prompts alternate batch after batch: each prefix is computed once
    while at most PREFIX_CACHE_SIZE are in use, the least recently used one going first."""
    from blsp import llm

    decoder = tiny_model.language_model.get_decoder()
    calls = []
    monkeypatch.setattr(decoder, "forward", lambda *a, _f=decoder.forward, **k: calls.append(1) or _f(*a, **k))
    prefixes = [(1, 2, 3), (1, 2, 4), (5, 6)]
    get = lambda model, prefix, batch: model.prefix_cache.get(model.language_model, prefix, batch, torch.float32,
                                                              model.lora_off)
    for _ in range(3):
        for p in prefixes:
            get(tiny_model, p, 2)
    assert len(calls) == len(prefixes)
    get(tiny_model, prefixes[0], 2)  # used again: now the most recent
    get(tiny_model, (9,), 1)  # a fourth: all kept
    get(tiny_model, (10,), 1)  # a fifth: the least recently used goes
    assert len(calls) == len(prefixes) + 2 and len(tiny_model.prefix_cache) == llm.PREFIX_CACHE_SIZE
    get(tiny_model, prefixes[0], 2)
    assert len(calls) == len(prefixes) + 2  # kept: used after prefixes[1] was
    get(tiny_model, prefixes[1], 2)
    assert len(calls) == len(prefixes) + 3  # crowded out, computed again


def test_shared_prefix_stops_where_rows_differ_or_speech_begins():
    ids = torch.tensor([[1, 2, 3, SPEECH_TOKEN_ID, 9], [1, 2, 3, SPEECH_TOKEN_ID, 8]])
    assert shared_prefix(ids, torch.ones_like(ids)) == [1, 2, 3]
    ids[1, 2] = 7
    assert shared_prefix(ids, torch.ones_like(ids)) == [1, 2]


def test_shared_prefix_stops_short_of_the_first_scored_position():
    # One text-only row is the same as itself to the end: the prefix must still leave out every
    # position whose hidden state predicts a label (here position 2 predicts label 3's token).
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5]])
    assert shared_prefix(ids, torch.ones_like(ids), labels) == [1, 2]
    assert shared_prefix(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX)) == [1, 2, 3, 4]


@pytest.mark.parametrize("use_prefix", [False, True], ids=["whole-sequence", "shared-prefix"])
def test_llm_checkpointing_gives_the_same_loss_and_gradients_and_recomputes(tiny_model, use_prefix):
    model = tiny_model
    batch = model.processor.collate(make_examples(model))
    prefix = shared_prefix(batch["input_ids"], batch["attention_mask"]) if use_prefix else ()
    calls = []
    mlp = model.language_model.get_decoder().layers[0].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)  # (hooks do not see a recompute)
    with torch.no_grad():
        model(**batch, shared_prefix=prefix)  # computes and keeps the prefix's keys and values
    results = []
    try:
        for checkpointing in (False, True):
            model.set_llm_checkpointing(checkpointing)
            model.zero_grad(set_to_none=True)
            calls.clear()
            out = model(**batch, shared_prefix=prefix)
            out.loss.backward()
            results.append((out.loss.detach(), [p.grad.clone() for p in model.adapter.parameters()], len(calls)))
    finally:
        model.set_llm_checkpointing(False)
        del mlp.forward
    (loss, grads, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (1, 2)  # the layer ran again in backward: it was checkpointed
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    for g, ref in zip(grads_ckpt, grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.language_model.parameters())


def test_token_embeddings_are_what_the_llm_reads_for_its_tokens():
    """Gemma scales its embeddings in the forward (sqrt(hidden)): the bridge's rows and the speech
    vectors' scale must be the scaled ones; a Llama's are its matrix itself, not a copy."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from blsp.llm import token_embeddings

    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    ids = torch.tensor([[3, 7, 11]])
    read = gemma.get_input_embeddings()(ids)[0]
    assert torch.allclose(token_embeddings(gemma)[ids[0]], read)
    assert torch.allclose(read, gemma.get_input_embeddings().weight[ids[0]] * 32 ** 0.5)  # not the bare matrix
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert token_embeddings(llama) is llama.get_input_embeddings().weight
