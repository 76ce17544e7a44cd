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


@pytest.fixture()
def http_shards(tiny_demo):
    """The tiny demo's shard directory served over HTTP on 127.0.0.1."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    shard_dir = tiny_demo[1]["shard_dir"]
    handler = functools.partial(Quiet, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield shard_dir, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_manifest_and_shards_stream_from_a_url(http_shards, tmp_path):
    """data.base_url: the manifest and the shards come from an HTTP server,
    as a prefix and as a `pipe:` command template; no local copy is needed."""
    from saat_dist.data.stream import load_labels, load_split

    shard_dir, url = http_shards
    local = load_split(shard_dir, "test", 32)
    elsewhere = tmp_path / "no-such-dir"  # shard_dir is not read when base_url is set
    for base in (url, f"pipe:curl -fsS {url}/{{name}}"):
        images, labels, index = load_split(elsewhere, "test", 32, base_url=base)
        assert torch.equal(images, local[0]) and torch.equal(labels, local[1]) and torch.equal(index, local[2])
        assert torch.equal(load_labels(elsewhere, "train", base), load_labels(shard_dir, "train"))
        stream = ShardStream(StreamSpec(shard_dir=str(elsewhere), split="train", batch_size=8, image_size=32,
                                       base_url=base))
        x, y, i = next(iter(stream))
        assert x.shape == (8, 3, 32, 32) and len(set(i.tolist())) == 8


def test_unreachable_manifest_url_names_it(http_shards, tmp_path):
    from saat_dist.data.shards import load_manifest

    _, url = http_shards
    with pytest.raises(FileNotFoundError, match=rf"{url}/nope/manifest.json"):
        load_manifest(tmp_path, f"{url}/nope")


def rewrite_sample(shard, key, change):
    """Rewrite ``shard`` with sample ``key``'s members passed through ``change(dict) -> dict``."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict] = {}
    for name, data in members:
        k, ext = name.split(".", 1)
        samples.setdefault(k, {})[ext] = data
    samples[key] = change(samples[key])
    with tarfile.open(shard, "w") as tar:
        for k, fields in samples.items():
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _wrong_width(fields):
    import json

    meta = json.loads(fields["json"])
    meta["label"] = meta["label"] + [0]
    return {**fields, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("change, problem", [
    (lambda f: {**f, **{e: b"not an image" for e in f if e != "json"}}, "undecodable .(png|jpg) image"),
    (_wrong_width, "label has 5 values, the data set has 4 classes"),
    (lambda f: {"json": f["json"]}, "no image"),
    (lambda f: {e: v for e, v in f.items() if e != "json"}, r"no .json member"),
])
def test_a_bad_sample_names_shard_and_key_or_is_skipped_and_counted(tmp_path, change, problem):
    root = make_dataset(tmp_path / "src", n=(40, 3, 4), size=(12, 12))
    convert(root, tmp_path / "out", shard_size=10, shard_multiple=1)
    rewrite_sample(tmp_path / "out" / "train-000001.tar", "00000013", change)
    with pytest.raises(ShardError, match=rf"train-000001.tar: sample 00000013: {problem}"):
        list(itertools.islice(ShardStream(spec(str(tmp_path / "out"), shuffle=False)), 10))
    s = ShardStream(spec(str(tmp_path / "out"), shuffle=False, skip_corrupt=True))
    idx = torch.cat([b[2] for b in itertools.islice(s, 9)])  # 36 samples: past the bad one
    assert 13 not in idx.tolist() and 14 in idx.tolist()  # only the bad sample is skipped
    assert s.skipped == 1 and s.state_dict()["skipped"] == 1


def test_a_rank_whose_shards_are_all_unreadable_stops_instead_of_spinning(tmp_path):
    root = make_dataset(tmp_path / "src", n=(20, 3, 4), size=(12, 12))
    convert(root, tmp_path / "out", shard_size=10, shard_multiple=1)
    for shard in (tmp_path / "out").glob("train-*.tar"):
        shard.write_bytes(b"garbage" * 50)
    s = ShardStream(spec(str(tmp_path / "out"), skip_corrupt=True))
    with pytest.raises(ShardError, match="none of its shards of split 'train' holds a readable sample"):
        next(s)
