"""WER and time of Whisper's greedy transcript (as decoder_states decodes it) under window rules."""
import json, sys, time, torch
from blsp.cpu import flush_denormals
flush_denormals()
from blsp.modeling import BlspModel
import blsp.modeling as M, blsp.whisper as W
from blsp.audio import AudioRef, load_audio, log_mel_spectrogram
from blsp.metrics import error_rates
model = BlspModel.from_pretrained("runs/ablation/decoder-demo")
tok = model.whisper_tokenizer if hasattr(model, "whisper_tokenizer") else None
from transformers import AutoTokenizer
from blsp.packaged import resolve
lines = [json.loads(l) for l in open("runs/ablation-data/behavior/train.jsonl")]
lines = lines[::9][:200]  # every 9th: all three voices, the whole range of lengths
refs = [r["text"] for r in lines]
wavs = [load_audio(AudioRef.parse(r["audio"], "runs/ablation-data/behavior")) for r in lines]
order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
n_mels = model.audio_tower.config.num_mel_bins
tokenizer = AutoTokenizer.from_pretrained(resolve("whisper-base"))
captured = {}
orig = W.greedy_decode
def grab(*a, **k):
    r = orig(*a, **k); captured.setdefault("tokens", []).extend(r[0]); return r
W.greedy_decode = grab
RULES = {
    "2x, 5 s floor (now)": M.decoder_window,
    "clip+1 s, 5 s floor": lambda n: min(max(-(-(n + 100) // 100) * 100, 500), 3000),
    "clip+2 s, 5 s floor": lambda n: min(max(-(-(n + 200) // 100) * 100, 500), 3000),
    "1.5x, 5 s floor": lambda n: min(max(-(-(n * 3 // 2) // 100) * 100, 500), 3000),
}
for name in sys.argv[1:] or RULES:
    M.decoder_window = RULES[name]
    hyps = {}
    t0 = time.perf_counter()
    for s in range(0, len(order), 16):
        ids = order[s:s + 16]
        mels = [log_mel_spectrogram(wavs[i], n_mels) for i in ids]
        L = torch.tensor([m.shape[-1] for m in mels]); b = torch.zeros(len(mels), n_mels, int(L.max()))
        for j, m in enumerate(mels): b[j, :, :m.shape[-1]] = m
        captured.clear()
        model.decoder_states(b, L)
        # greedy_decode runs per width group in sorted width order; map back through decoder_states' grouping
        widths = [M.decoder_window(int(n)) for n in L]
        rows = [j for w in sorted(set(widths)) for j, x in enumerate(widths) if x == w]
        for j, t in zip(rows, captured["tokens"]):
            hyps[ids[j]] = tokenizer.decode(t, skip_special_tokens=True).strip()
    dt = time.perf_counter() - t0
    e = error_rates(refs, [hyps[i] for i in range(len(refs))])
    print(f"{name:24s} WER {100*e['wer']:.1f}%  CER {100*e['cer']:.1f}%  {dt/len(refs):.3f} s/clip", flush=True)
