"""The text rows' answers kept between evaluations: read back only for the same frozen LLM and prompts."""

from __future__ import annotations

import blsp.inference
from blsp.answer_cache import AnswerCache, text_path_is_frozen
from blsp.data import Utterance
from blsp.tasks import text_generate


def _count_generate(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = blsp.inference.generate_from_examples

    def counted(model, examples, **kwargs):
        calls.append(len(examples))
        return real(model, examples, **kwargs)

    monkeypatch.setattr(blsp.inference, "generate_from_examples", counted)
    return calls


def _utterances(n: int) -> list[Utterance]:
    return [Utterance(id=f"u{i}", audio=f"u{i}.wav", text=f"text {i}", extra={}, source="test", line=i + 1)
            for i in range(n)]


def test_a_batch_answered_once_is_read_back_and_a_changed_prompt_or_budget_is_answered_again(tiny_model, tmp_path,
                                                                                            monkeypatch):
    calls = _count_generate(monkeypatch)
    cache = AnswerCache(tmp_path / "answers")
    utts, texts = _utterances(3), ["the cat sat", "on the mat", "a dog"]
    first = text_generate(tiny_model, utts, texts, "Summarise.", batch_size=2, max_new_tokens=5, progress=False,
                          cache=cache)
    assert calls == [2, 1]
    again = text_generate(tiny_model, utts, texts, "Summarise.", batch_size=2, max_new_tokens=5, progress=False,
                          cache=cache)
    assert again == first and calls == [2, 1]  # nothing decoded again
    text_generate(tiny_model, utts, texts, "Summarise.", batch_size=2, max_new_tokens=6, progress=False, cache=cache)
    text_generate(tiny_model, utts, ["the cat sat", "on the mat", "a cat"], "Summarise.", batch_size=2,
                  max_new_tokens=5, progress=False, cache=cache)
    assert calls == [2, 1, 2, 1, 1]  # a new budget: both batches; a new text: its batch only
    assert len(list((tmp_path / "answers").rglob("*.json"))) == 5


def test_an_unreadable_entry_is_answered_again(tiny_model, tmp_path, monkeypatch):
    calls = _count_generate(monkeypatch)
    cache = AnswerCache(tmp_path)
    args = (tiny_model, _utterances(1), ["hello there"], "Repeat.")
    first = text_generate(*args, max_new_tokens=4, progress=False, cache=cache)
    (entry,) = tmp_path.rglob("*.json")
    entry.write_text('{"answers": [')  # as if cut short
    assert text_generate(*args, max_new_tokens=4, progress=False, cache=cache) == first
    assert calls == [1, 1]


def test_no_key_when_lora_reaches_the_text_path(tiny_model, tmp_path):
    cache = AnswerCache(tmp_path)
    prompts = [tiny_model.processor.transcript_prompt("Repeat.", "hello")]
    assert text_path_is_frozen(tiny_model) and cache.key(tiny_model, prompts, 4, {}) is not None
    tiny_model.config.lora = {"rank": 8, "where": "speech"}
    assert cache.key(tiny_model, prompts, 4, {}) is not None  # speech positions only: the text path is the LLM's
    tiny_model.config.lora = {"rank": 8, "where": "all"}
    assert not text_path_is_frozen(tiny_model) and cache.key(tiny_model, prompts, 4, {}) is None


def test_the_cascades_transcripts_are_read_back_for_the_same_clips_and_whisper(tiny_whisper_dir, tmp_path,
                                                                                monkeypatch):
    import soundfile as sf

    import blsp.whisper
    from blsp.audio import AudioRef
    from blsp.fingerprint import weights_fingerprint
    from blsp.scoring import load_cascade_asr, whisper_transcripts
    from tests.conftest import tone

    utts = []
    for i, freq in enumerate((300.0, 500.0, 700.0)):
        sf.write(tmp_path / f"c{i}.wav", tone(0.5, freq), 16000)
        utts.append(Utterance(id=f"c{i}", audio=AudioRef.parse(str(tmp_path / f"c{i}.wav"), tmp_path), text="",
                              extra={}, source="test", line=i + 1))
    calls: list[int] = []
    real = blsp.whisper.transcribe

    def counted(model, tokenizer, audio, **kwargs):
        calls.append(len(audio))
        return real(model, tokenizer, audio, **kwargs)

    monkeypatch.setattr(blsp.whisper, "transcribe", counted)
    whisper = load_cascade_asr(tiny_whisper_dir)
    cache, fingerprint = AnswerCache(tmp_path / "answers"), weights_fingerprint(whisper[0])
    first = whisper_transcripts(whisper, utts, batch_size=2, progress=False, cache=cache, fingerprint=fingerprint)
    assert whisper_transcripts(whisper, utts, batch_size=2, progress=False, cache=cache,
                               fingerprint=fingerprint) == first
    assert calls == [2, 1]
    whisper_transcripts(whisper, utts, batch_size=2, progress=False, cache=cache, fingerprint="another whisper")
    assert calls == [2, 1, 2, 1]
