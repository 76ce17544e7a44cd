"""The streaming reader: one global order at any worker and loader count, resume (also at another
worker count), corrupt shards."""

import contextlib
import itertools
from pathlib import Path

import pytest
import torch

from saat_dist.data.convert import convert
from saat_dist.data.decode import ShardError
from saat_dist.data.source import DataSource
from saat_dist.data.stream import ShardStream, StreamSpec
from tests.test_data import make_dataset


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory):
    """A train split of 120 samples in 12 shards of 10 (indices 10 j .. 10 j + 9 in shard j)."""
    tmp = tmp_path_factory.mktemp("twelve")
    root = make_dataset(tmp / "src", n=(120, 3, 4), size=(12, 12))
    convert(root, tmp / "out", shard_size=10, shard_multiple=12)
    return str(tmp / "out")


def spec(shard_dir, **kw):
    base = dict(shard_dir=shard_dir, split="train", batch_size=4, image_size=12, seed=5)
    base.update(kw)
    return StreamSpec(**base)


def test_batches_have_the_promised_form(twelve_shards):
    x, y, idx = next(iter(ShardStream(spec(twelve_shards))))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 12, 12)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.shape == (4, 4) and set(y.unique().tolist()) <= {0.0, 1.0}
    assert idx.dtype == torch.int64


def steps(shards, world, steps, **kw):
    """Per step, every rank's samples (ranks in order): rank r's share of the global batch."""
    streams = [ShardStream(spec(shards, rank=r, world_size=world, **kw)) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = []
        for s in streams:
            per_rank.append(torch.cat([next(s)[2] for _ in range(s.spec.micro_batches)]).tolist())
        out.append(per_rank)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world, workers, micro", [(2, 0, 1), (3, 2, 1), (4, 1, 2), (6, 0, 1), (2, 3, 2)])
def test_the_global_batch_is_the_same_at_any_worker_and_loader_count(twelve_shards, world, workers, micro):
    """Step t holds the same samples at 1, 2, 3, 4 or 6 workers, with 0-3
    loader processes and 1-2 micro-batches; rank r holds the global batch's
    positions r, r + W, ... and reads only its own shards (j % W == r)."""
    ref = steps(twelve_shards, 1, 16, batch_size=24)  # 3+ epochs of 5 steps
    got = steps(twelve_shards, world, 16, batch_size=24, num_workers=workers, micro_batches=micro)
    for t, (one, many) in enumerate(zip(ref, got)):
        (order,) = one
        assert sorted(order) == sorted(i for share in many for i in share), t
        for r, share in enumerate(many):
            assert share == order[r::world], (t, r)  # position order, this rank's positions
            assert all((i // 10) % world == r for i in share), (t, r)  # only its own shards


def test_every_sample_once_per_epoch_and_epochs_differ(twelve_shards):
    s = ShardStream(spec(twelve_shards, batch_size=8))
    assert s.steps_per_epoch == 15
    first = [i for _, _, idx in s.epoch() for i in idx.tolist()]
    second = [i for _, _, idx in s.epoch() for i in idx.tolist()]
    assert sorted(first) == sorted(second) == list(range(120))
    assert first != second


def test_fewer_canonical_slots_than_shards(twelve_shards):
    """4 slots of 3 shards each: 2 and 4 workers read the same batches as 1."""
    ref = steps(twelve_shards, 1, 20, batch_size=8, slots=4)
    for world in (2, 4):
        got = steps(twelve_shards, world, 20, batch_size=8, slots=4)
        assert [sorted(i for share in g for i in share) for g in got] == [sorted(r[0]) for r in ref]
    with pytest.raises(ValueError, match="3 workers do not divide the 4 canonical slots"):
        ShardStream(spec(twelve_shards, world_size=3, slots=4))


def test_a_worker_count_that_does_not_divide_the_slots_is_a_clear_error(twelve_shards):
    with pytest.raises(ValueError, match="5 workers do not divide the 12 canonical slots"):
        ShardStream(spec(twelve_shards, world_size=5, batch_size=10))
    with pytest.raises(ValueError, match="global batch 6 does not split into 4 workers x 1 micro-batches"):
        ShardStream(spec(twelve_shards, world_size=4, batch_size=6))
    with pytest.raises(ValueError, match="at most one slot per shard"):
        ShardStream(spec(twelve_shards, slots=13))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(twelve_shards, workers):
    ref = ShardStream(spec(twelve_shards, num_workers=workers))
    reference = [idx.tolist() for _, _, idx in itertools.islice(ref, 40)]
    first = ShardStream(spec(twelve_shards, num_workers=workers))
    taken = [idx.tolist() for _, _, idx in itertools.islice(first, 13)]
    state = first.state_dict()
    resumed = ShardStream(spec(twelve_shards, num_workers=workers))
    resumed.load_state_dict(state)
    rest = [idx.tolist() for _, _, idx in itertools.islice(resumed, 27)]
    assert taken + rest == reference


def test_a_position_saved_at_one_worker_count_resumes_at_another(twelve_shards):
    one = ShardStream(spec(twelve_shards, batch_size=8))
    before = [next(one)[2].tolist() for _ in range(7)]
    state = one.state_dict()
    after_one = [next(one)[2].tolist() for _ in range(9)]
    two = [ShardStream(spec(twelve_shards, batch_size=8, rank=r, world_size=2)) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    after_two = [[next(s)[2].tolist() for s in two] for _ in range(9)]
    assert len(before) == 7
    assert [sorted(a) for a in after_one] == [sorted(x + y) for x, y in after_two]


def test_resume_refuses_another_global_order(twelve_shards):
    s = ShardStream(spec(twelve_shards, batch_size=4))
    other = ShardStream(spec(twelve_shards, batch_size=8))
    with pytest.raises(ValueError, match="global_batch"):
        other.load_state_dict(s.state_dict())


def test_corrupt_shard_reported_or_skipped(tmp_path):
    root = make_dataset(tmp_path / "src", n=(40, 3, 4), size=(12, 12))
    convert(root, tmp_path / "out", shard_size=10, shard_multiple=1)
    bad = Path(tmp_path / "out" / "train-000002.tar")
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ShardError, match="train-000002.tar"):
        list(itertools.islice(ShardStream(spec(str(tmp_path / "out"), shuffle=False)), 10))
    # two canonical slots of two shards: the bad shard's slot moves on to its other shard
    s = ShardStream(spec(str(tmp_path / "out"), shuffle=False, skip_corrupt=True, slots=2))
    idx = torch.cat([b[2] for b in itertools.islice(s, 15)])
    assert not any(20 <= i < 30 for i in idx.tolist())  # the bad shard's samples never appear
    assert s.skipped == 20  # 30 samples of its slot: 3 passes over shard 0, meeting shard 2 after the first two


@contextlib.contextmanager
def serving(directory):
    """``directory`` served over HTTP on 127.0.0.1: yields its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def http_shards(tiny_demo):
    """The tiny demo's shard directory served over HTTP on 127.0.0.1."""
    shard_dir = tiny_demo[1]["shard_dir"]
    with serving(shard_dir) as url:
        yield shard_dir, url


@pytest.mark.slow
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


def rewrite_sample(shard, key, change, restamp: bool = True):
    """Rewrite ``shard`` with sample ``key``'s members passed through
    ``change(dict) -> dict``. ``restamp``: record the new shard's sha256 in
    the manifest, as if the sample had been bad when the data set was
    converted; else the manifest keeps the old digest (changed afterwards)."""
    import io
    import json
    import tarfile

    from saat_dist.checkpoint import file_sha256

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
    if restamp:
        manifest_path = Path(shard).parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                if entry["name"] == Path(shard).name:
                    entry["sha256"] = file_sha256(shard)
        manifest_path.write_text(json.dumps(manifest))


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
    with pytest.raises(ShardError, match=r"none of the shards \[0\] of canonical slot 0 of split 'train' holds a "):
        next(s)


def _relabel(fields):
    """One changed byte of the .json: the first label value flipped."""
    import json

    meta = json.loads(fields["json"])
    meta["label"][0] = 1 - meta["label"][0]
    return {**fields, "json": json.dumps(meta).encode()}


@pytest.fixture()
def relabelled(tmp_path):
    """40 train samples in 4 shards; shard 1's sample 13 relabelled after
    conversion (the manifest keeps the converted shard's sha256)."""
    root = make_dataset(tmp_path / "src", n=(40, 3, 4), size=(12, 12))
    convert(root, tmp_path / "out", shard_size=10, shard_multiple=1)
    rewrite_sample(tmp_path / "out" / "train-000001.tar", "00000013", _relabel, restamp=False)
    return str(tmp_path / "out")


def test_a_shard_changed_after_conversion_stops_the_stream_naming_it(relabelled):
    """The label edit decodes fine; only the digest knows. The stream stops at
    the end of that shard, before any of its samples is used (one canonical
    slot: the shards are read in turn, 4 samples a step)."""
    from saat_dist.data.decode import ShardDigestError

    s = ShardStream(spec(relabelled, shuffle=False, slots=1))
    seen = []
    with pytest.raises(ShardDigestError, match=r"shard \S*train-000001.tar: its sha256 is [0-9a-f]{64}, the "
                                               r"manifest says [0-9a-f]{64}: the shard changed after"):
        for _ in range(10):
            seen += next(s)[2].tolist()
    assert seen == list(range(8))  # two steps of shard 0; the third needs shard 1 and stops
    # with the check off (data.verify_sha256: false) the edit trains unnoticed, as before the check
    off = ShardStream(spec(relabelled, shuffle=False, slots=1, source=DataSource.open(relabelled, verify=False)))
    assert torch.cat([next(off)[2] for _ in range(10)]).tolist() == list(range(40))


def test_a_changed_shard_is_skipped_whole_and_counted_with_skip_corrupt(relabelled):
    s = ShardStream(spec(relabelled, shuffle=False, skip_corrupt=True, slots=2))
    idx = torch.cat([next(s)[2] for _ in range(15)]).tolist()
    assert not any(10 <= i < 20 for i in idx)  # no sample of the changed shard, not only the edited one
    assert s.skipped == 30  # its slot's 30 samples of 60 take 3 passes over shards 1 (skipped) and 3


def test_every_reader_checks_the_digest(relabelled):
    """Labels for the code bank, evaluation batches, items by index, images
    for the report: each raises on the changed shard."""
    from saat_dist.data.decode import ShardDigestError

    source = DataSource.open(relabelled)
    for read in (lambda: source.labels("train"), lambda: list(source.batches("train", 12, 8)),
                 lambda: source.read_items("train", [13], 12), lambda: source.images("train", [13, 39], 12)):
        with pytest.raises(ShardDigestError, match="train-000001.tar"):
            read()
    assert source.labels("train", [0, 2, 3])[0].tolist() == [*range(10), *range(20, 40)]  # the others are fine


def test_a_changed_shard_served_over_http_is_named(tiny_demo, tmp_path):
    """The same check on bytes from an HTTP server (no local file to re-read)."""
    import shutil

    from saat_dist.data.decode import ShardDigestError

    copy = tmp_path / "shards"
    shutil.copytree(tiny_demo[1]["shard_dir"], copy)
    rewrite_sample(copy / "test-000000.tar", next(_keys(copy / "test-000000.tar")), _relabel, restamp=False)
    with serving(copy) as url:
        with pytest.raises(ShardDigestError, match=rf"shard {url}/test-000000.tar: its sha256"):
            DataSource.open(str(tmp_path / "nowhere"), url).labels("test")


def _keys(shard):
    import tarfile

    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            yield m.name.split(".", 1)[0]
