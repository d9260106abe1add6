"""Greedy Whisper decoding: the states it returns chose its tokens, and a row never depends on its batch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, WhisperForConditionalGeneration

from blsp.whisper import decoding_ids, greedy_decode


def _whisper(path):
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _random_decode(path, seed: int, rows: int, max_new_tokens):
    """Greedy decoding of random encoder frames: (decoding ids, output weight, GreedyDecoding)."""
    model, tokenizer = _whisper(path)
    ids = decoding_ids(model, tokenizer, "en")
    torch.manual_seed(seed)
    encoded = torch.randn(rows, 12, model.config.d_model)
    weight = model.proj_out.weight.detach()
    return ids, weight, greedy_decode(model.get_decoder(), weight, encoded, ids, max_new_tokens=max_new_tokens)


def _allowed_logits(states: torch.Tensor, weight: torch.Tensor, ids: dict) -> torch.Tensor:
    """Each state's logits over the tokens greedy decoding may choose (text tokens, no suppressed
    ones, and at the first step none Whisper suppresses at the start)."""
    logits = states @ weight.T
    logits[:, ids["first_special"]:] = -torch.inf
    logits[:, ids["suppress"]] = -torch.inf
    logits[0, ids["begin_suppress"]] = -torch.inf
    return logits


def test_each_state_chose_its_token_and_decoding_stops_at_end_of_text(tiny_whisper_dir):
    ids, weight, (tokens, states, steps, _) = _random_decode(tiny_whisper_dir, seed=0, rows=3, max_new_tokens=8)
    assert states.shape[:2] == (3, int(steps.max()))
    assert any(tokens), "the tiny Whisper should emit some text, or this test checks nothing"
    for row in range(3):
        n = int(steps[row])
        assert len(tokens[row]) in (n, n - 1)  # n - 1: the last step chose end-of-text
        chosen = _allowed_logits(states[row, :n], weight, ids).argmax(-1).tolist()
        logits_eot = (states[row, :n] @ weight.T)[:, ids["eot"]]
        # text tokens never include the text-free ids; each state's best text token is its token
        assert all(t < ids["first_special"] for t in tokens[row])
        assert chosen[: len(tokens[row])] == tokens[row]
        if len(tokens[row]) == n - 1:
            assert logits_eot[-1] >= (states[row, n - 1] @ weight.T)[: ids["first_special"]].max()


def test_a_row_stops_at_end_of_text_and_its_last_state_is_the_one_that_chose_it(tiny_whisper_dir):
    model, tokenizer = _whisper(tiny_whisper_dir)
    ids = decoding_ids(model, tokenizer, "en")
    decoder, weight = model.get_decoder(), model.proj_out.weight.detach().clone()
    torch.manual_seed(0)
    encoded = torch.randn(2, 12, model.config.d_model)
    tokens, states, _, _ = greedy_decode(decoder, weight, encoded, ids, max_new_tokens=8)
    row = tokens[0]
    # the last step whose token is new: end-of-text made a hair likelier than that token stops there
    k = max(i for i, t in enumerate(row) if t not in row[:i])
    score = float(states[0, k] @ weight[row[k]])
    weight[ids["eot"]] = weight[row[k]] * (1 + (1e-3 if score > 0 else -1e-3))
    stopped, states, steps, _ = greedy_decode(decoder, weight, encoded, ids, max_new_tokens=8)
    assert stopped[0] == row[:k] and int(steps[0]) == k + 1
    assert int((states[0, k] @ weight.T)[: ids["first_special"]].argmax()) == ids["eot"]  # specials never emitted


def test_a_language_an_english_only_whisper_has_no_token_for_is_refused(tiny_whisper_dir):
    from blsp.errors import BlspError

    model, tokenizer = _whisper(tiny_whisper_dir)
    with pytest.raises(BlspError, match="English-only"):
        decoding_ids(model, tokenizer, "fr")


def test_a_rows_tokens_and_states_do_not_depend_on_its_batch_or_the_others_limits(tiny_whisper_dir):
    model, tokenizer = _whisper(tiny_whisper_dir)
    ids = decoding_ids(model, tokenizer, "en")
    torch.manual_seed(1)
    encoded = torch.randn(2, 10, model.config.d_model)
    decoder, weight = model.get_decoder(), model.proj_out.weight.detach()
    tokens, states, steps, _ = greedy_decode(decoder, weight, encoded, ids, max_new_tokens=torch.tensor([3, 9]))
    assert int(steps[0]) <= 3 and len(tokens[0]) <= 3
    for row, limit in ((0, 3), (1, 9)):
        alone_tokens, alone_states, alone_steps, _ = greedy_decode(decoder, weight, encoded[row:row + 1], ids, limit)
        n = int(alone_steps[0])
        assert alone_tokens[0] == tokens[row] and n == int(steps[row])
        torch.testing.assert_close(alone_states[0, :n], states[row, :n], atol=1e-5, rtol=1e-5)


def test_with_languages_each_row_gets_whispers_likeliest_language_after_the_first_token(tiny_whisper_dir):
    model, tokenizer = _whisper(tiny_whisper_dir)
    ids = decoding_ids(model, tokenizer, "en")
    decoder, weight = model.get_decoder(), model.proj_out.weight.detach()
    torch.manual_seed(2)
    encoded = torch.randn(3, 10, model.config.d_model)
    # two candidate "languages" (any ids serve the logic): the tiny Whisper is not multilingual
    candidates = [tokenizer.convert_tokens_to_ids("<|en|>"), tokenizer.convert_tokens_to_ids("<|translate|>")]
    detecting = {**ids, "languages": candidates}
    tokens, states, steps, _ = greedy_decode(decoder, weight, encoded, detecting, 6)
    with torch.inference_mode():
        first = decoder(input_ids=torch.tensor([ids["prompt"][:1]] * 3), encoder_hidden_states=encoded)
    chosen = [candidates[i] for i in (first.last_hidden_state[:, -1] @ weight[candidates].T).argmax(-1).tolist()]
    for row in range(3):  # the same as forcing the chosen language into the prompt
        forced = {**ids, "prompt": [ids["prompt"][0], chosen[row], *ids["prompt"][1:]]}
        alone_tokens, alone_states, n, _ = greedy_decode(decoder, weight, encoded[row:row + 1], forced, 6)
        assert alone_tokens[0] == tokens[row]
        torch.testing.assert_close(alone_states[0, : n[0]], states[row, : n[0]], atol=1e-5, rtol=1e-5)


def test_auto_language_on_an_english_only_whisper_has_nothing_to_detect(tiny_whisper_dir):
    model, tokenizer = _whisper(tiny_whisper_dir)
    assert decoding_ids(model, tokenizer, "auto") == {**decoding_ids(model, tokenizer, "en"), "languages": []}


def test_a_transcript_that_repeats_itself_is_one_whispers_loop_test_flags():
    from blsp.speech_sources import repeats_itself

    assert not repeats_itself([464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 314, 1101])
    assert repeats_itself([20, 642, 642] * 20)
    assert not repeats_itself([])


def test_mean_logprob_is_the_mean_log_softmax_of_each_chosen_token_end_of_text_included(tiny_whisper_dir):
    ids, weight, (tokens, states, steps, got) = _random_decode(tiny_whisper_dir, seed=1, rows=2,
                                                               max_new_tokens=torch.tensor([3, 8]))
    for row in range(2):
        n = int(steps[row])
        logits = _allowed_logits(states[row, :n], weight, ids)
        chosen = (tokens[row] + [ids["eot"]])[:n]
        expected = torch.stack([logits[k].log_softmax(-1)[t] for k, t in enumerate(chosen)]).mean()
        assert float(got[row]) == pytest.approx(float(expected), abs=1e-5)
        assert float(got[row]) <= 0.0
