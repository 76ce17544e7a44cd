"""Hash models: every backbone builds offline, outputs in (-1, 1), local weights load."""

import pytest
import torch
import torchvision

from saat_dist.models import build_hash_model
from saat_dist.models.backbones import BACKBONE_NAMES


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_backbone_forward(name):
    size = 64 if name == "alexnet" else 32
    model = build_hash_model(name, 24)
    model.eval()
    x = torch.rand(2, 3, size, size)
    u = model(x)
    assert u.shape == (2, 24)
    assert float(u.abs().max()) <= 1
    # temperature: small alpha flattens the codes
    assert float(model(x, alpha=0.1).abs().mean()) < float(u.abs().mean())


def test_normalisation_is_inside_the_model():
    model = build_hash_model("small_cnn", 16)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert "mean" not in model.state_dict()  # not a parameter, not saved


def test_pretrained_weights_from_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_hash_model("resnet18", 16, pretrained_path=str(path))
    trunk = model.backbone.net
    assert torch.equal(trunk.conv1.weight, ref.conv1.weight)
    assert torch.equal(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        build_hash_model("alexnet", 16, pretrained_path=str(tmp_path / "no-such.pth"))
    bad = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), bad)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_hash_model("vgg11", 16, pretrained_path=str(bad))
    with pytest.raises(ValueError, match="not one of"):
        build_hash_model("vgg13", 16)
