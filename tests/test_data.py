"""The list format -> shards conversion, its errors, and the demo data set."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saat_dist.data.convert import convert, plan_shards
from saat_dist.data.demo import DemoSpec, build_demo, relevance_fraction
from saat_dist.data.listformat import DataFormatError, read_split
from saat_dist.data.shards import MANIFEST
from saat_dist.data.decode import iter_shard
from saat_dist.data.stream import load_labels, load_split


def make_dataset(root: Path, n=(6, 3, 8), classes=4, size=(20, 16)):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for split, count in zip(("train", "test", "database"), n):
        paths, rows = [], []
        for i in range(count):
            rel = f"img/{split}_{i}.png" if i % 2 else f"img/{split}_{i}.jpg"
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / rel)
            paths.append(rel)
            label = rng.integers(0, 2, classes)
            label[i % classes] = 1
            rows.append(" ".join(map(str, label)))
        (root / f"{split}_img.txt").write_text("\n".join(paths) + "\n")
        (root / f"{split}_label.txt").write_text("\n".join(rows) + "\n")
    return root


def test_plan_shards_balanced_and_divisible():
    assert plan_shards(100, 10, 12) == [9] * 4 + [8] * 8
    assert plan_shards(5, 100, 12) == [1] * 5  # never more shards than samples
    assert plan_shards(1000, 1000, 1) == [1000]
    sizes = plan_shards(2000, 256, 12)
    assert len(sizes) == 12 and sum(sizes) == 2000 and max(sizes) - min(sizes) <= 1


def test_convert_round_trip(tmp_path):
    root = make_dataset(tmp_path / "src")
    manifest = convert(root, tmp_path / "out", shard_size=2, shard_multiple=2)
    out = tmp_path / "out"
    assert manifest["num_classes"] == 4
    for split in ("train", "test", "database"):
        lst = read_split(root, split)
        meta = manifest["splits"][split]
        assert meta["count"] == len(lst.paths)
        assert meta["image_sizes"] == {"20x16": len(lst.paths)}
        assert len(meta["shards"]) % 2 == 0
        seen = []
        for shard in meta["shards"]:
            path = out / shard["name"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            import webdataset as wds

            for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
                m = json.loads(sample["json"])
                ext = Path(lst.paths[m["index"]]).suffix.lstrip(".")
                assert sample[ext] == (root / lst.paths[m["index"]]).read_bytes()  # original bytes kept
                assert m["label"] == lst.labels[m["index"]].tolist()
                seen.append(m["index"])
            assert len(seen) - shard["first_index"] == shard["count"]
        assert seen == list(range(len(lst.paths)))
        labels = load_labels(out, split)
        assert np.array_equal(labels.numpy(), lst.labels)
        imgs, lab, idx = load_split(out, split, 24)
        assert imgs.shape == (len(lst.paths), 3, 24, 24) and idx.tolist() == list(range(len(lst.paths)))
    all_sets = {tuple(r) for s in ("train", "test", "database") for r in read_split(root, s).labels.tolist()}
    assert {tuple(s) for s in manifest["label_sets"]} == all_sets
    # converting the same data set again is allowed and gives the same shards
    again = convert(root, out, shard_size=2, shard_multiple=2)
    assert again == manifest


def _expect_error(root, out, match):
    with pytest.raises(DataFormatError, match=match):
        convert(root, out, shard_size=2, shard_multiple=1)
    assert not (out / MANIFEST).exists()


@pytest.mark.parametrize("case", ["missing_image", "unreadable_image", "wrong_width", "not_binary",
                                  "length_mismatch", "empty_split", "missing_list"])
def test_bad_input_names_file_and_line(tmp_path, case):
    root = make_dataset(tmp_path / "src")
    out = tmp_path / "out"
    if case == "missing_image":
        (root / "img/test_1.png").unlink()
        _expect_error(root, out, r"test_img\.txt:2: image .*test_1\.png is missing")
    elif case == "unreadable_image":
        (root / "img/database_3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        _expect_error(root, out, r"database_img\.txt:4: image .*database_3\.png is unreadable")
    elif case == "wrong_width":
        lines = (root / "train_label.txt").read_text().splitlines()
        lines[2] += " 1"
        (root / "train_label.txt").write_text("\n".join(lines) + "\n")
        _expect_error(root, out, r"train_label\.txt:3: 5 label values, expected 4")
    elif case == "not_binary":
        lines = (root / "database_label.txt").read_text().splitlines()
        lines[4] = "1 0 2 0"
        (root / "database_label.txt").write_text("\n".join(lines) + "\n")
        _expect_error(root, out, r"database_label\.txt:5: label values must be 0 or 1, found '2'")
    elif case == "length_mismatch":
        lines = (root / "test_label.txt").read_text().splitlines()
        (root / "test_label.txt").write_text("\n".join(lines[:-1]) + "\n")
        _expect_error(root, out, r"test_img\.txt has 3 lines but .*test_label\.txt has 2")
    elif case == "empty_split":
        (root / "test_img.txt").write_text("")
        (root / "test_label.txt").write_text("")
        _expect_error(root, out, r"test_img\.txt: split 'test' is empty")
    elif case == "missing_list":
        (root / "database_label.txt").unlink()
        _expect_error(root, out, r"database_label\.txt: file is missing")
    # nothing was written before the error
    assert not out.exists() or not any(out.iterdir())


def test_refuses_directory_of_another_dataset(tmp_path):
    a = make_dataset(tmp_path / "a")
    b = make_dataset(tmp_path / "b", n=(5, 3, 7))
    convert(a, tmp_path / "out", shard_size=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(DataFormatError, match="already holds another data set"):
        convert(b, tmp_path / "out", shard_size=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # nothing lost
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataFormatError, match="not a saat-dist shard directory"):
        convert(a, tmp_path / "other", shard_size=4)


def test_corrupt_shard_is_named(tmp_path):
    root = make_dataset(tmp_path / "src")
    convert(root, tmp_path / "out", shard_size=100, shard_multiple=1)
    shard = tmp_path / "out" / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(Exception, match="train-000000.tar"):
        list(iter_shard(str(shard), 16))


@pytest.mark.slow
def test_demo_is_real_multilabel_and_reproducible(tmp_path, tiny_demo):
    out, summary = tiny_demo
    from tests.conftest import TINY

    # same seed -> byte-identical shards and manifest
    again = build_demo(tmp_path / "again", TINY)
    a, b = Path(summary["shard_dir"]), Path(again["shard_dir"])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # query mosaics use only source digits never used in train or database
    sources = json.loads((out / "list" / "sources.json").read_text())
    seen_train = {d for img in sources["train"] + sources["database"] for d in img}
    seen_query = {d for img in sources["test"] for d in img}
    assert seen_query and not (seen_query & seen_train)
    # labels are the digits present: 1..3 per image, multi-hot over 10 classes
    labels = load_labels(a, "train").numpy()
    assert labels.shape == (TINY.train, 10)
    assert set(labels.sum(1).astype(int)) == {1, 2, 3}
    # relevance like NUS-WIDE's: between 0.2 and 0.5
    assert 0.2 <= summary["relevance_fraction"] <= 0.5
    q, d = load_labels(a, "test").numpy(), load_labels(a, "database").numpy()
    assert relevance_fraction(q, d) == pytest.approx(summary["relevance_fraction"])


@pytest.mark.slow
def test_demo_single_label_variant(tmp_path):
    spec = DemoSpec(train=40, query=10, database=50, min_digits=1, max_digits=1, seed=1, shard_size=10)
    summary = build_demo(tmp_path, spec)
    labels = load_labels(summary["shard_dir"], "database").numpy()
    assert (labels.sum(1) == 1).all()
    assert summary["relevance_fraction"] < 0.2  # one label of ten: ~0.1


@pytest.mark.slow
def test_other_seed_differs(tmp_path, tiny_demo):
    from tests.conftest import TINY
    import dataclasses

    other = build_demo(tmp_path, dataclasses.replace(TINY, seed=TINY.seed + 1))
    a = Path(tiny_demo[1]["shard_dir"]) / "train-000000.tar"
    assert a.read_bytes() != (Path(other["shard_dir"]) / "train-000000.tar").read_bytes()


def test_converter_warns_about_data_that_skews_results(tmp_path, caplog):
    root = make_dataset(tmp_path / "src", n=(6, 3, 8))
    labels = (root / "test_label.txt").read_text().splitlines()
    labels[1] = "0 0 0 0"  # a query without labels
    (root / "test_label.txt").write_text("\n".join(labels) + "\n")
    queries = (root / "test_img.txt").read_text().splitlines()
    db = (root / "database_img.txt").read_text().splitlines()
    db[5] = queries[2]  # a query that is also a database image
    (root / "database_img.txt").write_text("\n".join(db) + "\n")
    with caplog.at_level("WARNING"):
        convert(root, tmp_path / "out", shard_size=4, shard_multiple=1)
    text = caplog.text
    assert "1 of 3 queries have no label (lines 2)" in text and "each counts as AP 0 in mAP" in text
    assert f"1 images are listed both as queries (test_img.txt) and in database_img.txt, e.g. {queries[2]} " \
           "(test_img.txt:3)" in text
    assert "train_img.txt" not in text  # no overlap with train


def test_resize_and_centre_crop_as_torchvision():
    """data.resize: the reference's Resize(256) + CenterCrop(224), here at a small size."""
    import torchvision.transforms.v2 as T

    from saat_dist.data.decode import resize_image

    g = torch.Generator().manual_seed(0)
    for h, w in ((40, 60), (60, 40), (48, 48)):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        ref = T.CenterCrop(24)(T.Resize(32, antialias=True)(img))
        got = resize_image(img, 24, resize=32)
        assert got.shape == (3, 24, 24) and got.dtype == torch.uint8
        assert int((got.int() - ref.int()).abs().max()) <= 1  # rounding of the interpolation
    assert resize_image(img, 24).shape == (3, 24, 24)  # no resize: straight to S x S


@pytest.mark.slow
def test_the_harder_demo_variant(tmp_path):
    """Colours and clutter: RGB mosaics with the same labels, strokes in the
    cells the plain mosaic leaves empty; the plain variant stays byte-identical."""
    plain = DemoSpec(train=12, query=4, database=12, seed=2, shard_size=4)
    hard = DemoSpec(train=12, query=4, database=12, seed=2, shard_size=4, colour=True, clutter=2)
    a = build_demo(tmp_path / "a", plain)
    b = build_demo(tmp_path / "b", hard)
    digest = lambda d: hashlib.sha256((Path(d) / "manifest.json").read_bytes()).hexdigest()  # noqa: E731
    # the manifest (with every shard's sha256) of the plain variant, as built before the harder variant existed
    assert digest(a["shard_dir"]) == "289e7cc6c3d544bfa8767575b2c73f28d1f9b00798fffa14782c16d8952bc6a3"
    assert digest(b["shard_dir"]) != digest(a["shard_dir"])
    for split in ("train", "test", "database"):  # the same labels: the variant changes pixels only
        assert (tmp_path / "a" / "list" / f"{split}_label.txt").read_text() == \
            (tmp_path / "b" / "list" / f"{split}_label.txt").read_text()
    im_plain = np.array(Image.open(tmp_path / "a" / "list" / "images" / "train" / "000000.png"))
    im_hard = np.array(Image.open(tmp_path / "b" / "list" / "images" / "train" / "000000.png"))
    assert im_plain.ndim == 2 and im_hard.shape == (56, 56, 3)
    assert not (im_hard[..., 0] == im_hard[..., 1]).all()  # colour
    # clutter: cells left empty by the plain mosaic now hold strokes
    sources = json.loads((tmp_path / "a" / "list" / "sources.json").read_text())
    n_digits = [len(s) for s in sources["train"]]
    cells = [im_plain[r:r + 28, c:c + 28] for r in (0, 28) for c in (0, 28)]
    empty = [i for i, cell in enumerate(cells) if cell.max() == 0]
    assert empty and n_digits[0] == 4 - len(empty)
    bg = im_hard[0, 0].astype(int)

    def stands_out(i):
        r, c = divmod(i, 2)
        return np.abs(im_hard[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28].astype(int) - bg).max() > 40

    assert any(stands_out(i) for i in empty)  # the fragments landed in empty cells
    with pytest.raises(ValueError, match="clutter"):
        DemoSpec(clutter=-1)
