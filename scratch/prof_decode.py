import json, time, torch
from blsp.cpu import flush_denormals
flush_denormals()
from blsp.modeling import BlspModel
import blsp.modeling as M, blsp.whisper as W
from blsp.audio import AudioRef, load_audio, log_mel_spectrogram
model = BlspModel.from_pretrained("runs/ablation/decoder-demo")
lines = [json.loads(l) for l in open("runs/ablation-data/behavior/train.jsonl")][:400]
wavs = [load_audio(AudioRef.parse(r["audio"], "runs/ablation-data/behavior")) for r in lines]
wavs.sort(key=len); wavs = wavs[150:214]
n_mels = model.audio_tower.config.num_mel_bins
t = {"enc": 0.0, "dec": 0.0}
orig_enc, orig_dec = M.run_whisper_encoder, W.greedy_decode
def enc(*a, **k):
    t0 = time.perf_counter(); r = orig_enc(*a, **k); t["enc"] += time.perf_counter() - t0; return r
def dec(*a, **k):
    t0 = time.perf_counter(); r = orig_dec(*a, **k); t["dec"] += time.perf_counter() - t0; return r
M.run_whisper_encoder = enc; W.greedy_decode = dec
t0 = time.perf_counter()
for s in range(0, len(wavs), 16):
    mels = [log_mel_spectrogram(w, n_mels) for w in wavs[s:s+16]]
    L = torch.tensor([m.shape[-1] for m in mels]); b = torch.zeros(len(mels), n_mels, int(L.max()))
    for i, m in enumerate(mels): b[i, :, :m.shape[-1]] = m
    model.decoder_states(b, L)
tot = time.perf_counter() - t0
print(f"{len(wavs)} clips, {sum(map(len,wavs))/16000/len(wavs):.2f} s avg: total {tot:.1f}s = {tot/len(wavs):.3f}/clip; encoder {t['enc']:.1f}s decode {t['dec']:.1f}s")
