"""Hash models: every backbone builds offline, outputs in (-1, 1), local weights load."""

import pytest
import torch
import torchvision

from saat_dist.models import build_hash_model
from saat_dist.models.backbones import BACKBONE_NAMES


@pytest.mark.slow
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


@pytest.mark.slow
def test_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        build_hash_model("alexnet", 16, pretrained_path=str(tmp_path / "no-such.pth"))
    bad = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), bad)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_hash_model("resnet50", 16, pretrained_path=str(bad))  # another architecture's weights
    with pytest.raises(ValueError, match="not one of"):
        build_hash_model("vgg13", 16)


def test_model_files_with_a_bias_before_the_hash_batchnorm_still_load():
    """saat-dist 0.1 had a bias in front of the hash BatchNorm: it folds into
    the running mean, so the eval-mode codes are the same."""
    model = build_hash_model("small_cnn", 16, width=8)
    assert model.hash_layer.bias is None
    model.hash_bn.running_mean.uniform_(-0.5, 0.5)
    model.hash_bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    old = dict(model.state_dict())
    bias = torch.randn(16) * 0.1
    old["hash_layer.bias"] = bias
    old["hash_bn.running_mean"] = old["hash_bn.running_mean"] + bias  # as the old model would have tracked it
    with torch.no_grad():
        logits_old = (model.hash_layer(model.backbone((x - model.mean) / model.std)) + bias - old["hash_bn.running_mean"]) \
            / torch.sqrt(model.hash_bn.running_var + model.hash_bn.eps) * model.hash_bn.weight + model.hash_bn.bias
        fresh = build_hash_model("small_cnn", 16, width=8)
        fresh.load_state_dict(old)
        fresh.eval()
        assert torch.allclose(fresh(x), torch.tanh(logits_old), atol=1e-6)
    # without a hash BatchNorm the layer keeps its bias
    assert build_hash_model("small_cnn", 16, hash_bn=False).hash_layer.bias is not None
