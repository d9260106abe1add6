"""blsp.features: the on-disk feature cache and its in-memory layer."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from blsp.audio import AudioRef
from blsp.features import FeatureCache


def clip(tmp_path, name: str) -> AudioRef:
    path = tmp_path / f"{name}.wav"
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000)
    return AudioRef(str(path))


def test_features_read_once_are_kept_in_memory_up_to_the_budget(tmp_path, monkeypatch):
    a, b = clip(tmp_path, "a"), clip(tmp_path, "b")
    cache = FeatureCache(tmp_path / "cache", "enc", memory_mb=(10 * 4 * 2 + 1) / 2**20)  # room for one clip
    cache.save(a, torch.ones(10, 4))
    cache.save(b, torch.full((10, 4), 2.0))
    reads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *args, **kw: reads.append(args[0]) or real_load(*args, **kw))
    for _ in range(3):
        assert cache.load(a).tolist() == torch.ones(10, 4).tolist()
        assert cache.load(b, dtype=None).dtype == torch.float16  # as stored
        assert cache.load(b)[0, 0] == 2.0
    # a: read once and kept; b did not fit the budget: read from disk every time
    assert reads.count(cache.path(a)) == 1 and reads.count(cache.path(b)) == 6
    assert cache.memory_bytes == 10 * 4 * 2


def test_no_memory_budget_reads_the_disk_every_time_and_a_new_save_replaces_the_kept_copy(tmp_path):
    a = clip(tmp_path, "a")
    off = FeatureCache(tmp_path / "cache", "enc", memory_mb=0)
    off.save(a, torch.ones(3, 2))
    off.load(a)
    assert not off.memory
    kept = FeatureCache(tmp_path / "cache", "enc", memory_mb=1)
    assert kept.load(a).sum() == 6 and kept.memory_bytes == 12
    kept.save(a, torch.zeros(5, 2))  # re-encoded: the kept copy must not outlive it
    assert kept.load(a).shape == (5, 2) and kept.load(a).sum() == 0 and kept.memory_bytes == 20
