"""What the speed benchmarks (train_step.py, generate.py) run on, shared by both.

- `cpu`: the packaged Whisper base and SmolLM2-135M-Instruct, real weights.
- `gpu`: randomly initialised models of realistic size built from configs (Whisper small's
  encoder and a 1B Llama-style LLM shaped like Llama 3.2 1B), so a bare GPU machine with no hub
  and no packaged models can run them: speed does not depend on the weights' values. The
  tokenizer is a word-level one built here with a ChatML template; the token ids it uses are a
  subset of the LLM's vocabulary, which changes no shape.
- `--tiny` shrinks the `gpu` preset's models (same code path) to check it on a CPU in seconds.

Only torch, transformers and tokenizers are needed at import time (no soundfile: the clips are
made here, not read).
"""

from __future__ import annotations

import json
from pathlib import Path

import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from blsp.audio import SAMPLE_RATE

# Words for synthetic transcripts and continuations: ordinary English, so a real tokenizer
# splits them into a realistic number of tokens (about 1.3 a word for SmolLM2's).
WORDS = (
    "the of and to in is was that for it with as on be at by this had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three river morning garden letter window music doctor city evening story"
).split()
SYSTEM_PROMPT = "You are a helpful assistant. You answer questions and follow instructions carefully and briefly."


@dataclass(frozen=True)
class Built:
    model: object  # a BlspModel
    description: str


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def build_model(preset: str, device: torch.device, tiny: bool = False, seed: int = 0) -> Built:
    torch.manual_seed(seed)
    if preset == "cpu":
        from blsp.modeling import BlspModel

        model = BlspModel.from_components("whisper-base", "smollm2-135m-instruct", seed=seed).to(device)
        return Built(model, "packaged whisper-base encoder + SmolLM2-135M-Instruct (real weights)")
    if preset == "gpu":
        return build_random_model(device, tiny, seed)
    raise SystemExit(f"unknown preset {preset!r}")


def word_tokenizer():
    """A word-level fast tokenizer over WORDS with ChatML specials and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS) | set(SYSTEM_PROMPT.lower().split())
                                                          | {w.strip(".,") for w in SYSTEM_PROMPT.split()}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}")
    return fast


def random_configs(tiny: bool, tokenizer):
    from transformers import LlamaConfig, WhisperConfig

    if tiny:
        enc = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
        llm = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=256, vocab_size=8192)
    else:  # Whisper small's encoder; Llama 3.2 1B's shape (1.24B parameters, tied embeddings)
        enc = dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072)
        llm = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   intermediate_size=8192, vocab_size=128256)
    wcfg = WhisperConfig(num_mel_bins=80, max_source_positions=1500, decoder_layers=1, decoder_attention_heads=4,
                         vocab_size=51865, **enc)
    lcfg = LlamaConfig(max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **llm)
    return wcfg, lcfg


def build_random_model(device: torch.device, tiny: bool, seed: int) -> Built:
    from transformers import AutoModelForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from blsp.fingerprint import weights_fingerprint
    from blsp.modeling import BlspConfig, BlspModel

    tokenizer = word_tokenizer()
    wcfg, lcfg = random_configs(tiny, tokenizer)
    with torch.device(device):  # built where it runs: a 1B model's random init is slow on a CPU
        tower = WhisperEncoder(wcfg)
        llm = AutoModelForCausalLM.from_config(lcfg)
    tower.requires_grad_(False).eval()
    llm.requires_grad_(False).eval()
    config = BlspConfig(encoder_config=wcfg, llm_config=lcfg, encoder_name="random-whisper-small-encoder",
                        llm_name="random-llama-1b", encoder_fingerprint=weights_fingerprint(tower),
                        llm_fingerprint=weights_fingerprint(llm), system_prompt=SYSTEM_PROMPT)
    model = BlspModel(config, audio_tower=tower, language_model=llm)
    model.adapter.to(device)
    model.init_adapter(seed)
    model.attach_processor(tokenizer)
    n = sum(p.numel() for p in llm.parameters())
    size = "tiny (--tiny) " if tiny else ""
    return Built(model, f"{size}random-init Whisper-small-shaped encoder ({wcfg.encoder_layers} layers, d {wcfg.d_model}) "
                        f"+ Llama-style LLM ({lcfg.num_hidden_layers} layers, hidden {lcfg.hidden_size}, "
                        f"{n / 1e6:,.0f}M parameters)")


def random_clips(n: int, seconds: float, spread: float, seed: int) -> list[np.ndarray]:
    """n noise clips of `seconds` +- `spread` (uniform): lengths vary, as a corpus's do."""
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(seconds - spread, seconds + spread, n)
    return [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32) for s in lengths]


def random_text(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))


def now() -> float:
    return time.perf_counter()


def write_result(result: dict, output: str | None, name: str) -> Path:
    """The result as JSON at `output`, default benchmarks/results/NAME-PRESET.json; its path."""
    path = Path(output or Path(__file__).parent / "results" / f"{name}-{result['preset']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
