"""Tiny, randomly initialised backbones built from configs, so most tests run in seconds offline.

The tokenizer is a real fast BPE tokenizer trained here on a few sentences, with a ChatML chat
template like SmolLM2's, so prompt splicing is exercised as with a real chat model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "continue the following text in a coherent and engaging style with less than forty words",
    "please transcribe the following audio into english text",
    "a speech encoder turns audio into frames and the adapter maps them to the language model",
    "hello world this is a small test of the speech language model toolkit",
]


def byte_level_bpe(specials: list[str], corpus: list[str], vocab_size: int, unk: str | None = None):
    """A real byte-level BPE tokenizer (as GPT-2's, Whisper's, SmolLM2's) trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return tok


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|notimestamps|>"]


def whisper_tokenizer_json(path: Path):
    """A small byte-level BPE with Whisper's special tokens, saved as a tokenizer.json. As in
    Whisper's vocabulary, the text tokens come first and the special ones after them."""
    from tokenizers import AddedToken

    tok = byte_level_bpe([], ["the quick brown fox jumps over the lazy dog"], 300)
    tok.add_special_tokens([AddedToken(t, special=True) for t in WHISPER_SPECIALS])
    tok.save(str(path))
    return tok


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Nothing a test using this may write to the real ~/.cache/blsp."""
    import blsp.packaged
    import blsp.trainer

    cache = tmp_path / "blsp-cache"
    monkeypatch.setenv("BLSP_CACHE", str(cache))
    monkeypatch.setattr(blsp.packaged, "CACHE_DIR", cache)
    monkeypatch.setattr(blsp.trainer, "CACHE_DIR", cache)
    return cache


def build_tokenizer(out_dir: Path):
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], CORPUS, 400, unk="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Local directories of a tiny Whisper and a tiny Llama with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    wcfg = WhisperConfig(vocab_size=100, num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                         decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_source_positions=1500, max_target_positions=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2,
                         begin_suppress_tokens=None, suppress_tokens=None)
    WhisperForConditionalGeneration(wcfg).save_pretrained(root / "whisper")
    tok = build_tokenizer(root / "llm")
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(lcfg).save_pretrained(root / "llm")
    return {"encoder": str(root / "whisper"), "llm": str(root / "llm")}


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory):
    """A tiny random Whisper that, unlike conftest's, has a Whisper tokenizer: the cascade runs."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    root = tmp_path_factory.mktemp("whisper-tok")
    whisper_tokenizer_json(root / "tokenizer.json")
    fast = WhisperTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<|endoftext|>")
    eot = fast.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=len(fast), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
                        max_source_positions=1500, max_target_positions=16, pad_token_id=eot, bos_token_id=eot,
                        eos_token_id=eot, decoder_start_token_id=fast.convert_tokens_to_ids("<|startoftranscript|>"),
                        begin_suppress_tokens=None, suppress_tokens=None)
    WhisperForConditionalGeneration(cfg).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return str(root / "model")


@pytest.fixture
def tiny_model(tiny_dirs):
    from blsp.modeling import BlspModel

    return BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0)


def tone(seconds: float, freq: float = 440.0, sr: int = 16000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_corpus(root: Path, n: int = 6, with_continuation: bool = False, seconds: float = 0.6) -> Path:
    """A manifest of n clips of different lengths (tones), relative paths, optional continuations."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wav").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        path = root / "wav" / f"u{i}.wav"
        sf.write(path, tone(seconds + 0.37 * i, 200 + 60 * i), 16000)
        rec = {"id": f"u{i}", "audio": f"wav/u{i}.wav", "text": CORPUS[i % len(CORPUS)]}
        if with_continuation:
            rec["continuation"] = CORPUS[(i + 1) % len(CORPUS)]
            rec["truncated"] = False
        lines.append(json.dumps(rec))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def speak(text: str, wav_path: Path, voice: str = "slt") -> Path:
    """Speech from Debian's flite text-to-speech engine (installed by `make test`)."""
    import shutil
    import subprocess

    if shutil.which("flite") is None:
        pytest.fail("flite is not installed: run `make test` (or apt-get install flite)")
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav_path)], check=True)
    return wav_path


def make_examples(model, n_frames=(40, 90, 17), targets=("hello world", "the quick brown fox jumps", "dog")):
    """Seeded continuation examples with random speech features of the given lengths."""
    from blsp.processing import Example
    from blsp.prompts import CONTINUATION_INSTRUCTION

    proc = model.processor
    prompt = proc.speech_prompt(CONTINUATION_INSTRUCTION)
    torch.manual_seed(1)
    d = model.config.encoder_config.d_model
    return [
        Example(pieces=prompt, features=[torch.randn(t, d)], target=proc.prompt.target_ids(text))
        for t, text in zip(n_frames, targets)
    ]


def assert_loss_batch_invariant(model, features: list[torch.Tensor], target: str = "a b c") -> torch.Tensor:
    """Each clip's continuation loss is the same batched with the others as alone (padding, masked
    slots and the voice rows take no part in another clip's loss); returns the batch's loss."""
    from blsp.processing import Example
    from blsp.prompts import CONTINUATION_INSTRUCTION

    proc = model.processor
    examples = [Example(pieces=proc.speech_prompt(CONTINUATION_INSTRUCTION), features=[f],
                        target=proc.prompt.target_ids(target)) for f in features]
    with torch.no_grad():
        both = model(**proc.collate(examples)).loss_sum
        alone = sum(model(**proc.collate([e])).loss_sum for e in examples)
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)
    return both


def compressing_model(model, seed: int = 0, speech_vectors: str = "adapter"):
    """`model` with a CTC head that reads some frames as blank and others as tokens."""
    vocab = list(range(5, 25))
    model.enable_ctc_compression(vocab, speech_vectors)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.ctc_head.blank.copy_(torch.randn(model.ctc_head.blank.shape, generator=g))
        model.ctc_head.scale.fill_(4.0)
    return model
