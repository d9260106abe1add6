"""Tar shards: the writer/reader round trip, errors naming shard and member, the stream order."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from blsp.errors import BlspError, InputError
from blsp.shards import INDEX_FILE, ShardIndex, ShardWriteOptions, iter_shard, write_shards
from blsp.streaming import rank_count, rank_stream, shuffled

from conftest import write_corpus


def shard_corpus(tmp_path, n=6, size=2, **kw):
    manifest = write_corpus(tmp_path / "data", n=n, with_continuation=True)
    write_shards([manifest], tmp_path / "shards", ShardWriteOptions(shard_size=size, **kw))
    return manifest, ShardIndex.load(tmp_path / "shards")


def test_round_trip_keeps_every_field_and_the_audio_bytes(tmp_path):
    manifest, index = shard_corpus(tmp_path, n=5, size=2)
    assert [s.count for s in index.shards] == [2, 2, 1] and index.encoder_fingerprint is None
    items = [x for i in range(3) for x in iter_shard(index.path(i))]
    lines = [json.loads(l) for l in manifest.read_text().splitlines()]
    assert [x.utterance.id for x in items] == [l["id"] for l in lines]
    for x, line in zip(items, lines):
        assert x.utterance.text == line["text"]
        assert x.utterance.extra["continuation"] == line["continuation"]
        assert x.read_bytes() == (manifest.parent / line["audio"]).read_bytes()
        assert x.waveform().shape[0] > 8000
    assert items[2].utterance.source == str(index.path(1)) and items[2].utterance.line == 1


def test_features_in_shards_equal_the_feature_cache(tiny_dirs, tmp_path):
    from blsp.features import FeatureCache
    from blsp.shards import _EncoderOnly

    _, index = shard_corpus(tmp_path, n=3, size=2, encoder=tiny_dirs["encoder"], feature_cache=str(tmp_path / "f"))
    enc = _EncoderOnly(tiny_dirs["encoder"])
    assert index.encoder_fingerprint == enc.config.encoder_fingerprint
    x = next(iter_shard(index.path(0)))
    assert x.has_features and x.features().shape[1] == 32
    ref = next(iter(__import__("blsp.data", fromlist=["read_manifest"]).read_manifest(
        tmp_path / "data" / "manifest.jsonl").utterances)).audio
    np.testing.assert_array_equal(x.features().numpy(), FeatureCache(tmp_path / "f", index.encoder_fingerprint).load(ref).numpy())


def rewrite(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_shards_name_the_shard_and_member(tmp_path):
    _, index = shard_corpus(tmp_path, n=2, size=2)
    path = index.path(0)
    good = [(m.name, tarfile.open(path).extractfile(m).read()) for m in tarfile.open(path)]
    cases = {
        "not valid JSON": [(good[0][0], b"{oops")] + good[1:],
        "no data member": good[:3],
        "data member without its KEY.json": [good[1], good[0]] + good[2:],
    }
    for reason, members in cases.items():
        rewrite(path, members)
        with pytest.raises(InputError) as err:
            list(iter_shard(path))
        assert str(path) in str(err.value) and reason in str(err.value), str(err.value)
        if reason == "not valid JSON":
            assert good[0][0] in str(err.value)
    path.write_bytes(b"\0garbage" * 10)
    with pytest.raises(InputError, match="shard-00000.tar"):
        list(iter_shard(path))
    with pytest.raises(InputError, match="index says"):  # the size check of the index
        ShardIndex.load(index.root)
    (index.root / INDEX_FILE).unlink()
    with pytest.raises(BlspError, match="no index.json"):
        ShardIndex.load(index.root)


def test_a_truncated_member_is_named(tmp_path):
    _, index = shard_corpus(tmp_path, n=2, size=2)
    x = next(iter_shard(index.path(0)))
    data = index.path(0).read_bytes()
    index.path(0).write_bytes(data[: x.offset + 10])
    with pytest.raises(InputError) as err:
        x.read_bytes()
    assert x.member in str(err.value) and "shard-00000.tar" in str(err.value)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_utterance_once_per_epoch_across_ranks(tmp_path, world):
    _, index = shard_corpus(tmp_path, n=7, size=2)
    for epoch in range(2):
        ids = [x.utterance.id for r in range(world) for x in rank_stream(index, epoch, 0, r, world, buffer=3)]
        assert Counter(ids) == Counter(f"u{i}" for i in range(7))
        assert sum(rank_count(index, epoch, 0, r, world) for r in range(world)) == 7
    a = [x.utterance.id for x in rank_stream(index, 0, 0, 0, 1, 3)]
    assert a == [x.utterance.id for x in rank_stream(index, 0, 0, 0, 1, 3)]  # deterministic
    assert a != [x.utterance.id for x in rank_stream(index, 1, 0, 0, 1, 3)]  # reshuffled per epoch


def test_shuffle_buffer_emits_each_item_once():
    import random

    out = list(shuffled(iter(range(50)), 8, random.Random(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))


def test_streamed_training_resumes_where_an_uninterrupted_run_ends(tiny_dirs, tmp_path, monkeypatch, private_cache):
    import torch
    from safetensors.torch import load_file

    from blsp.streaming import StreamingTrainer
    from blsp.options import TrainOptions
    from blsp.training import run_train

    shard_corpus(tmp_path, n=5, size=2)
    opts = TrainOptions.from_flat(encoder=tiny_dirs["encoder"], llm=tiny_dirs["llm"], batch_size=2, lr=5e-3, warmup_steps=1,
                        max_steps=6, save_every=2, shuffle_buffer=2)
    data = [str(tmp_path / "shards")]
    run_train(data, tmp_path / "full", opts)
    real_step = StreamingTrainer.train_step

    def dying_step(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(StreamingTrainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_train(data, tmp_path / "killed", opts)
    monkeypatch.setattr(StreamingTrainer, "train_step", real_step)
    run_train(data, tmp_path / "killed", opts, resume=True)
    full, resumed = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("full", "killed"))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    order = [(tmp_path / d / "data_order" / "rank-0.jsonl").read_text() for d in ("full", "killed")]
    assert order[0] == order[1] and len(order[0].splitlines()) == 6


def test_streaming_refuses_what_it_cannot_do(tiny_dirs, tmp_path, private_cache):
    from blsp.options import TrainOptions
    from blsp.training import run_train

    shard_corpus(tmp_path, n=3, size=2)
    opts = TrainOptions.from_flat(encoder=tiny_dirs["encoder"], llm=tiny_dirs["llm"], max_steps=1, warm_start="ctc",
                        warm_start_steps=2)
    with pytest.raises(BlspError, match="--warm-start"):
        run_train([str(tmp_path / "shards")], tmp_path / "run", opts)
    with pytest.raises(BlspError, match="only --data"):
        run_train([str(tmp_path / "shards"), str(tmp_path / "data" / "manifest.jsonl")], tmp_path / "run", opts)
