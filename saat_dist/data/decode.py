"""Reading and decoding: one shard to its raw samples (its bytes read once,
their sha256 checked against the manifest's as they stream past), one
sample to (image, label, global index), one shard to its decoded samples,
and the reference's Resize + CenterCrop. Everything that reads shards (the
training stream, the data source) reads through here; the errors name the
shard and the sample."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen

from saat_dist.data.shards import IMAGE_EXTS


class ShardError(RuntimeError):
    """A shard could not be read; the message names the shard and the sample."""


class ShardDigestError(ShardError):
    """A shard's bytes are not those its manifest recorded (sha256): it was
    changed after conversion or damaged on the way. ``good``: the samples of
    it already decoded (a reader that skips the shard counts them)."""

    def __init__(self, message: str, good: int = 0) -> None:
        super().__init__(message)
        self.good = good


class _HashingReader:
    """A binary stream that hashes the bytes its reader takes from it."""

    def __init__(self, stream) -> None:
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """The digest of the whole stream: what tarfile left unread (the
        archive's end padding) passes through here first."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def shard_samples(url: str, sha256: str | None = None,
                  select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The raw samples of one shard (its members grouped by key, as
    WebDataset does), its bytes read once. With ``sha256`` (the manifest's
    digest of the shard) the bytes are hashed as they stream past and a
    mismatch raises ``ShardDigestError`` when the shard ends, before the
    reader returns: a reader that must not use a changed shard's samples
    holds them until then (the training stream does)."""
    stream = gopen(url, "rb")
    reader = _HashingReader(stream) if sha256 else stream
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": reader}], select_files=select_files)
        yield from wds.tariterators.group_by_keys(files)
        if sha256:
            got = reader.hexdigest_to_end()
            if got != sha256:
                raise ShardDigestError(f"shard {url}: its sha256 is {got}, the manifest says {sha256}: the shard "
                                       "changed after `data convert` (or was damaged on the way)")
    finally:
        stream.close()


class SampleError(ValueError):
    """One sample is unusable (missing field, undecodable image, bad label)."""


def _resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``resize``, as torchvision's Resize(resize) computes it."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


# which resize+crop decoding produced the images (data.resize set): part of the
# settings that identify a trained model and its results (evaluation.identity);
# version 2 is reference_transform's (PIL), version 1 was torch's interpolation
RESIZE_TRANSFORM = "pil-bilinear-resize-centre-crop/2"


def reference_transform(im: Image.Image, image_size: int, resize: int) -> Image.Image:
    """The reference's transform (xandery-geek/SAAT, utils/data_provider.py:
    torchvision's Resize(256) + CenterCrop(224) on the PIL image) with PIL's
    bilinear resampling, as torchvision applies it to a PIL image: the same
    pixels (tests/test_convert.py compares)."""
    size = _resized_size(*im.size, resize)
    if size != im.size:  # torchvision leaves an image whose shorter side is already ``resize``
        im = im.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
    return im.crop((left, top, left + image_size, top + image_size))


def resize_image(img_CHW: torch.Tensor, image_size: int, resize: int | None = None) -> torch.Tensor:
    """uint8 3 x S x S of a uint8 image tensor. ``resize`` None: resized
    straight to S x S. Else as torchvision's Resize(resize) + CenterCrop(S) on
    a tensor (within 1/255): the shorter side becomes ``resize`` (aspect
    kept), then the centre S x S. ``decode_sample`` applies the PIL form,
    ``reference_transform``."""
    h, w = img_CHW.shape[1:]
    if resize is None:
        size = (image_size, image_size)
    elif h <= w:
        size = (resize, int(resize * w / h))
    else:
        size = (int(resize * h / w), resize)
    if (h, w) != size:
        img_CHW = F.interpolate(img_CHW[None].float(), size=size, mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    if resize is not None:
        top, left = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
        img_CHW = img_CHW[:, top : top + image_size, left : left + image_size].contiguous()
    return img_CHW


def decode_sample(sample: dict, image_size: int, num_classes: int | None = None, resize: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 image 3 x S x S, float multi-hot label, global index) of one raw
    sample (``resize``: see ``reference_transform``, else the image is
    resized straight to S x S); ``SampleError`` says what is wrong with it."""
    if "json" not in sample:
        raise SampleError("no .json member (label and index)")
    try:
        meta = json.loads(sample["json"])
        index, label = meta["index"], meta["label"]
    except (ValueError, KeyError, TypeError) as e:
        raise SampleError(f"unreadable .json metadata ({type(e).__name__}: {e})") from e
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SampleError(f"index {index!r} is not an integer >= 0")
    if not isinstance(label, list) or any(v not in (0, 1) or isinstance(v, bool) for v in label):
        raise SampleError("label is not a list of 0/1 values")
    if num_classes is not None and len(label) != num_classes:
        raise SampleError(f"label has {len(label)} values, the data set has {num_classes} classes")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SampleError(f"no image (looked for {IMAGE_EXTS})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            rgb = im.convert("RGB")
            if resize is not None:  # in PIL, as the reference: its exact pixels, and faster than in torch
                rgb = reference_transform(rgb, image_size, resize)
            img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise SampleError(f"undecodable .{ext} image ({type(e).__name__}: {e})") from e
    if resize is None:
        img = resize_image(img, image_size)
    return img, torch.tensor(label, dtype=torch.float32), index


def iter_shard(url: str, image_size: int, num_classes: int | None = None, *, expected: int | None = None,
               on_skip=None, resize: int | None = None, sha256: str | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Decoded samples of one shard, in stored order. A bad sample or an
    unreadable shard raises ``ShardError`` naming the shard and the sample
    key, unless ``on_skip(count, message)`` is given: then a bad sample is
    skipped, and so is the rest of a shard that cannot be read on (counted
    against ``expected``, the manifest's count). ``sha256``: checked as in
    ``shard_samples``; a mismatch always raises (``ShardDigestError``)."""
    key, good, bad = None, 0, 0
    try:
        for sample in shard_samples(url, sha256):
            key = sample.get("__key__")
            try:
                item = decode_sample(sample, image_size, num_classes, resize)
            except SampleError as e:
                message = f"shard {url}: sample {key}: {e}"
                if on_skip is None:
                    raise ShardError(message) from e
                bad += 1
                on_skip(1, message)
                continue
            good += 1
            yield item
    except ShardDigestError as e:
        e.good = good
        raise
    except ShardError:
        raise
    except Exception as e:
        where = f"after sample {key}" if key else "at its start"
        message = f"shard {url}: unreadable {where}: {type(e).__name__}: {e}"
        if on_skip is None:
            raise ShardError(message) from e
        on_skip(max(0, (expected or 0) - good - bad), message)
