"""The streaming reader: rank/worker splitting, equal steps, resume, corrupt shards."""

import itertools
from pathlib import Path

import pytest
import torch

from saat_dist.data.convert import convert
from saat_dist.data.stream import ShardError, ShardStream, StreamSpec
from tests.test_data import make_dataset


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory):
    """A train split of 50 samples in 5 shards of 10: 5 does not divide by 2 ranks."""
    tmp = tmp_path_factory.mktemp("five")
    root = make_dataset(tmp / "src", n=(50, 3, 4), size=(12, 12))
    convert(root, tmp / "out", shard_size=10, shard_multiple=1)
    return str(tmp / "out")


def spec(shard_dir, **kw):
    base = dict(shard_dir=shard_dir, split="train", batch_size=4, image_size=12, seed=5)
    base.update(kw)
    return StreamSpec(**base)


def test_batches_have_the_promised_form(five_shards):
    x, y, idx = next(iter(ShardStream(spec(five_shards))))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 12, 12)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.shape == (4, 4) and set(y.unique().tolist()) <= {0.0, 1.0}
    assert idx.dtype == torch.int64


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_steps_and_never_runs_dry(five_shards, workers):
    """5 shards over 2 ranks (x 2 loader workers: 4 slots): no rank runs dry."""
    streams = [ShardStream(spec(five_shards, rank=r, world_size=2, num_workers=workers)) for r in range(2)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch == (50 // 2) // 4
    seen = [[], []]
    for epoch in range(4):  # several epochs: rank 0 holds 3 shards in some, 2 in others
        for r, s in enumerate(streams):
            batches = list(s.epoch())
            assert len(batches) == s.steps_per_epoch
            for _, _, idx in batches:
                seen[r].extend(idx.tolist())
    # the first batches (every slot's first shard) come from disjoint shards
    first0, first1 = set(seen[0][:8]), set(seen[1][:8])
    assert not (first0 & first1)
    # over the epochs every sample is read
    assert set(seen[0]) | set(seen[1]) == set(range(50))


def test_too_few_shards_is_a_clear_error(five_shards):
    with pytest.raises(ValueError, match="fewer than ranks x loader workers = 6"):
        ShardStream(spec(five_shards, world_size=3, num_workers=2))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(five_shards, workers):
    ref = ShardStream(spec(five_shards, num_workers=workers))
    reference = [idx.tolist() for _, _, idx in itertools.islice(ref, 30)]
    first = ShardStream(spec(five_shards, num_workers=workers))
    taken = [idx.tolist() for _, _, idx in itertools.islice(first, 13)]
    state = first.state_dict()
    resumed = ShardStream(spec(five_shards, num_workers=workers))
    resumed.load_state_dict(state)
    rest = [idx.tolist() for _, _, idx in itertools.islice(resumed, 17)]
    assert taken + rest == reference


def test_resume_refuses_another_layout(five_shards):
    s = ShardStream(spec(five_shards, world_size=2))
    other = ShardStream(spec(five_shards, world_size=1))
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(s.state_dict())


def test_corrupt_shard_reported_or_skipped(tmp_path):
    root = make_dataset(tmp_path / "src", n=(40, 3, 4), size=(12, 12))
    convert(root, tmp_path / "out", shard_size=10, shard_multiple=1)
    bad = Path(tmp_path / "out" / "train-000002.tar")
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="train-000002.tar"):
        list(itertools.islice(ShardStream(spec(str(tmp_path / "out"), shuffle=False)), 10))
    s = ShardStream(spec(str(tmp_path / "out"), shuffle=False, skip_corrupt=True))
    idx = torch.cat([b[2] for b in itertools.islice(s, 15)])
    assert not any(20 <= i < 30 for i in idx.tolist())  # the bad shard's samples never appear
