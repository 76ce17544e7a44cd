"""`data convert` at size: images checked in a process pool (shards identical
to a serial run), progress lines, bad images named by list file and line, and
the reference's Resize(256) + CenterCrop(224) against torchvision's."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from saat_dist.data.convert import convert
from saat_dist.data.decode import decode_sample
from saat_dist.data.imagecheck import CHUNK
from saat_dist.data.listformat import DataFormatError
from saat_dist.data.shards import MANIFEST
from tests.test_data import make_dataset

# more images than one chunk per split: two processes share every split
COUNTS = (CHUNK + 9, 7, CHUNK + 2)


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_parallel_conversion_writes_the_serial_bytes(tmp_path):
    root = make_dataset(tmp_path / "src", n=COUNTS)
    serial = convert(root, tmp_path / "serial", shard_size=16, shard_multiple=1, workers=1)
    parallel = convert(root, tmp_path / "parallel", shard_size=16, shard_multiple=1, workers=2)
    assert parallel == serial
    assert _shards(tmp_path / "parallel") == _shards(tmp_path / "serial")  # every shard and the manifest
    assert sum(s["count"] for s in serial["splits"].values()) == sum(COUNTS)
    assert serial["splits"]["train"]["image_sizes"] == {"20x16": COUNTS[0]}


def test_progress_lines_count_checked_and_written_images(tmp_path, caplog):
    root = make_dataset(tmp_path / "src", n=COUNTS)
    total = sum(COUNTS)
    with caplog.at_level(logging.INFO, logger="saat_dist"):
        convert(root, tmp_path / "out", shard_size=16, shard_multiple=1, workers=2, progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data convert:")]
    checked = [line for line in lines if line.startswith("data convert: checked")]
    written = [line for line in lines if line.startswith("data convert: written")]
    # one line per chunk of checked images, one per shard written, each with its rate and ETA
    assert [int(line.split()[3].split("/")[0]) for line in checked] == \
        [min(total, k) for k in range(CHUNK, total + CHUNK, CHUNK)]
    assert checked[-1].startswith(f"data convert: checked {total}/{total} images (")
    assert "image/s, ETA 0:00:00" in checked[-1]
    assert len(written) == sum(-(-n // 16) for n in COUNTS)
    assert written[-1].startswith(f"data convert: written {total}/{total}")


def _truncated_jpeg(path):
    """A JPEG cut after its header and part of its image data."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


@pytest.mark.parametrize("workers", [1, 2])
def test_first_bad_image_in_list_order_is_named(tmp_path, workers):
    """Two bad images in chunks that different processes check: the error
    names the first in list order (file and line), and nothing is written."""
    root = make_dataset(tmp_path / "src", n=COUNTS)
    _truncated_jpeg(root / f"img/database_{CHUNK}.jpg")  # line CHUNK + 1: the second chunk of the split
    (root / "img/database_3.png").unlink()  # earlier in the list, so named first
    out = tmp_path / "out"
    with pytest.raises(DataFormatError, match=r"database_img\.txt:4: image .*database_3\.png is missing$"):
        convert(root, out, shard_size=16, shard_multiple=1, workers=workers)
    assert not out.exists()
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "img/database_3.png")
    with pytest.raises(DataFormatError) as err:
        convert(root, out, shard_size=16, shard_multiple=1, workers=workers)
    message = str(err.value)
    assert message.startswith(f"{root}/database_img.txt:{CHUNK + 1}: image {root}/img/database_{CHUNK}.jpg "
                              "is unreadable (") and "truncated" in message and "\n" not in message
    assert not out.exists() and not (out / MANIFEST).exists()


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        convert(make_dataset(tmp_path / "src"), tmp_path / "out", workers=0)


def _photo(w: int, h: int, seed: int) -> bytes:
    """A JPEG with detail at every scale (gradients, blocks and noise), so that interpolation differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    blocks = np.kron(rng.integers(0, 256, (h // 5 + 1, w // 5 + 1, 3)), np.ones((5, 5, 1)))[:h, :w]
    img = 0.5 * blocks + 0.3 * np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    img += rng.normal(0, 20, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_transform_is_the_references_resize_and_centre_crop():
    """The reference (xandery-geek/SAAT, utils/data_provider.py) reads each
    image with PIL, ``convert('RGB')``, then torchvision's Resize(256) +
    CenterCrop(224) on the PIL image (bilinear). Ours, from the same bytes
    (the training stream's decoding), gives exactly the same pixels."""
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    # landscape, portrait, square, an odd margin on each side, one already at 256
    for seed, (w, h) in enumerate([(500, 375), (375, 500), (300, 300), (641, 427), (256, 341)]):
        data = _photo(w, h, seed)
        sample = {"jpg": data, "json": json.dumps({"index": seed, "label": [1, 0]}).encode()}
        ours, _, _ = decode_sample(sample, 224, 2, resize=256)
        ref = torch.from_numpy(np.array(reference(Image.open(io.BytesIO(data)).convert("RGB")))).permute(2, 0, 1)
        assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == torch.uint8
        assert torch.equal(ours, ref), (w, h, int((ours.int() - ref.int()).abs().max()))


@pytest.mark.slow
def test_bench_convert_small_compares_both_loops():
    """`bench convert` at its small size: the pre-#18 loop and today's wrote the same shards."""
    from saat_dist.bench import SMALL, bench_convert

    r = bench_convert(SMALL["convert"])
    assert r["identical_shards"] is True and r["sizes"]["images"] == 300
    assert r["before_18"]["images_per_second"] > 0 and r["now"]["images_per_second"] > 0
    decoders = r["check_decoders_one_process"]
    assert decoders["images"] == 150
    assert decoders["pil_images_per_second"] > 0 and decoders["torchvision_images_per_second"] > 0
