import json, time, torch
from blsp.cpu import flush_denormals
flush_denormals()
from blsp.modeling import BlspModel
import blsp.modeling as M
from blsp.audio import AudioRef, load_audio, log_mel_spectrogram
model = BlspModel.from_pretrained("runs/ablation/decoder-demo")
lines = [json.loads(l) for l in open("runs/ablation/test_selected.jsonl")][:16]
wavs = sorted([load_audio(AudioRef.parse(r["audio"], "runs/ablation")) for r in lines], key=len)
dec = model.speech_decoder
times = []
orig = dec.forward
def fwd(*a, **k):
    t0 = time.perf_counter(); r = orig(*a, **k); times.append((k["input_ids"].shape, time.perf_counter() - t0, type(k.get("past_key_values", k.get("cache"))).__name__)); return r
dec.forward = fwd
n_mels = model.audio_tower.config.num_mel_bins
mels = [log_mel_spectrogram(w, n_mels) for w in wavs]
L = torch.tensor([m.shape[-1] for m in mels]); b = torch.zeros(len(mels), n_mels, int(L.max()))
for i, m in enumerate(mels): b[i, :, :m.shape[-1]] = m
model.decoder_states(b, L)
for x in times[:4] + times[-3:]: print(x)
print(len(times), sum(t for _, t, _ in times))
