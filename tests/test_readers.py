"""The speech readers (blsp.readers): CTC compression and token vectors (the bridge: tests/test_bridge.py)."""

from __future__ import annotations

import pytest
import torch

from blsp.modeling import BlspModel
from blsp.processing import SPEECH_TOKEN_ID
from blsp.readers.ctc import ctc_compress

from conftest import compressing_model, make_examples


def log_probs_reading(labels: list[list[int]], n_classes: int = 4) -> torch.Tensor:
    return torch.log_softmax(torch.nn.functional.one_hot(torch.tensor(labels), n_classes).float() * 10, -1)



def test_ctc_compress_drops_blanks_and_merges_each_run_into_its_mean():
    x = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2)
    #          blank, a, a, blank, a, b, b, (padding)      all blank
    labels = [[0, 1, 1, 0, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0]]
    log_probs = log_probs_reading(labels)
    log_probs[1, 2, 0] -= 1.0  # the second clip's least-blank frame is kept, so it is never empty
    out, keep = ctc_compress(x, torch.tensor([7, 5]), log_probs)
    assert keep.tolist() == [[False, True, False, False, True, True, False, False],
                             [False, False, True, False, False, False, False, False]]
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 2]) / 2)
    torch.testing.assert_close(out[0, 4], x[0, 4])  # "a" again after a blank: a new token
    torch.testing.assert_close(out[0, 5], (x[0, 5] + x[0, 6]) / 2)
    torch.testing.assert_close(out[1, 2], x[1, 2])



def test_compressed_speech_equals_feeding_only_the_kept_vectors(tiny_model):
    """Masking dropped frames (no attention, no position) is the same as removing them."""
    model = compressing_model(tiny_model)
    proc = model.processor
    examples = make_examples(model)
    batch = proc.collate(examples)
    embeds, mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["encoder_features"],
                                        batch["encoder_lengths"])
    slots = batch["input_ids"] == SPEECH_TOKEN_ID
    dropped = slots & (mask == 0)
    assert dropped.any() and (slots & (mask == 1)).any()
    logits = model(**batch, return_logits=True).logits
    for r in range(len(examples)):
        keep = mask[r].bool()
        alone = model.language_model(inputs_embeds=embeds[r][keep][None]).logits[0]
        torch.testing.assert_close(logits[r][keep], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speech_vectors", ["adapter", "tokens"])
def test_compressing_model_saves_and_loads_its_ctc_head(tiny_model, tmp_path, speech_vectors):
    model = compressing_model(tiny_model, speech_vectors=speech_vectors)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.speech_compression == "ctc" and loaded.config.ctc_vocab == list(range(5, 25))
    assert loaded.config.speech_vectors == speech_vectors
    torch.testing.assert_close(loaded.ctc_head.blank, model.ctc_head.blank)
    batch = model.processor.collate(make_examples(model))
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_token_vectors_are_the_heads_posterior_mix_of_token_embeddings(tiny_model):
    """speech_vectors "tokens": each kept vector is sum_c p(c | frame, not blank) * E[c]; a head
    sure of one token hands the LLM exactly that token's embedding."""
    model = compressing_model(tiny_model, speech_vectors="tokens")
    head = model.ctc_head
    x = torch.randn(2, 6, head.rows.shape[1])
    mix = head.token_mix(head(x))
    probs = torch.softmax(head(x)[..., 1:], -1)
    torch.testing.assert_close(mix, torch.einsum("bsc,cd->bsd", probs, head.rows))
    # Step 2's loss reaches the adapter through the mix (with "adapter" vectors too, but here the
    # adapter's own vectors never enter the LLM).
    batch = model.processor.collate(make_examples(model))
    model(**batch).loss.backward()
    assert model.adapter.fc1.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    with torch.no_grad():
        head.bias[1:].fill_(-1e4)
        head.bias[3] = 1e4  # always token vocab[2]
    torch.testing.assert_close(head.token_mix(head(x)), head.rows[2].expand(2, 6, -1))
