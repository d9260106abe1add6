"""The CTC head's vocabulary: rare tokens handed down to their BPE parts, and spelled with them."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from blsp.vocabulary import Speller, bpe_merges, ctc_vocabulary, single_byte_tokens
from conftest import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    build_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(tmp_path_factory.getbasetemp() / "tok0")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_every_merge_joins_two_tokens_into_a_third(tok):
    merges = bpe_merges(tok)
    assert merges
    strings = tok.convert_ids_to_tokens
    for token, (left, right) in merges.items():
        assert strings(left) + strings(right) == strings(token)


def test_min_count_one_keeps_exactly_the_tokens_seen(tok):
    seqs = [ids(tok, " the quick brown fox"), ids(tok, " the lazy dog")]
    assert ctc_vocabulary(seqs) == sorted({t for s in seqs for t in s})


def test_rare_tokens_hand_their_count_to_their_parts(tok):
    merges = bpe_merges(tok)
    frequent = ids(tok, " the")
    word = next(t for t in ids(tok, " quick brown fox jumps") if t in merges and t not in frequent)
    seqs = [frequent] * 3 + [[word]]
    vocab = ctc_vocabulary(seqs, tok, min_count=2)
    assert set(frequent) <= set(vocab) and word not in vocab
    assert set(single_byte_tokens(tok)) <= set(vocab)
    # Seen three times as a whole word, it is kept whole at min_count 3 and handed down at 4.
    assert set(frequent) <= set(ctc_vocabulary(seqs, tok, min_count=3))
    assert not set(frequent) & set(ctc_vocabulary(seqs, tok, min_count=4)) - set(single_byte_tokens(tok))


def test_a_part_is_kept_when_rare_words_share_it(tok):
    merges = bpe_merges(tok)
    # Two different rare words made from one common part: alone each is below min_count 2, but the
    # part they share reaches it once both hand their counts down.
    parents: dict[int, list[int]] = {}
    for token, (left, _) in merges.items():
        if left in merges:
            parents.setdefault(left, []).append(token)
    part, words = next((p, w) for p, w in parents.items() if len(w) >= 2)
    vocab = ctc_vocabulary([[words[0]], [words[1]]], tok, min_count=2)
    assert part in vocab and words[0] not in vocab and words[1] not in vocab


def test_speller_writes_the_same_text_with_kept_tokens_only(tok):
    train = [ids(tok, " the quick brown fox jumps over the lazy dog")] * 3
    vocab = ctc_vocabulary(train, tok, min_count=3)
    speller = Speller(tok, vocab)
    for text in [" the quick brown fox", " a speech encoder turns audio into frames", " zebra 1000s"]:
        spelled = speller(ids(tok, text))
        assert set(spelled) <= set(vocab)
        assert tok.decode(spelled) == text
    assert speller(ids(tok, " the")) == ids(tok, " the")  # kept tokens pass through


def test_speller_leaves_out_what_it_cannot_spell(tok):
    specials = tok.convert_tokens_to_ids(["<|im_start|>"])
    assert Speller(tok, single_byte_tokens(tok))(specials + ids(tok, " fox")) == Speller(tok, single_byte_tokens(tok))(ids(tok, " fox"))
