"""Feature extractors: torchvision backbones (no downloads) and a small CNN.

Each builder returns ``(module, feature_dim)``; the module maps a normalised
image batch to a flat feature vector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from saat_dist.checkpoint import CheckpointError, load_state


class SmallCNN(nn.Module):
    """Four conv blocks for 32-64 px images; trains in minutes on 2 CPU cores."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
            block(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class _TorchvisionTrunk(nn.Module):
    """A torchvision classifier without its last (1000-way) layer."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net = net
        if kind == "resnet":
            self.out_dim = net.fc.in_features
            net.fc = nn.Identity()
        else:  # alexnet / vgg: drop the final Linear of the classifier
            self.out_dim = net.classifier[-1].in_features
            net.classifier = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_TORCHVISION = {
    "alexnet": ("alexnet", "classifier"),
    "vgg11": ("vgg11", "classifier"),
    "vgg16": ("vgg16", "classifier"),
    "vgg19": ("vgg19", "classifier"),
    "resnet18": ("resnet18", "resnet"),
    "resnet50": ("resnet50", "resnet"),
}

BACKBONE_NAMES = ("small_cnn", *_TORCHVISION)


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Load torchvision-format ImageNet weights from a local file.

    The classifier's last layer may be absent or of another size (it is not
    used); every other parameter must match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights: no file at {path}")
    state = load_state(path)  # weights_only=True; a file of anything else is a CheckpointError naming it
    if "state_dict" in state:
        state = state["state_dict"]
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable]
    # Only the dropped final layer may be missing.
    unexpected_missing = [k for k in missing if not k.startswith(("fc.", "classifier.6."))]
    if unexpected_missing:
        raise CheckpointError(
            f"pretrained weights {path}: {len(unexpected_missing)} parameters missing or of "
            f"another shape, e.g. {unexpected_missing[:3]}"
        )
    net.load_state_dict(usable, strict=False)


def build_backbone(name: str, pretrained_path: str | None = None, width: int = 32) -> nn.Module:
    """Build a backbone by name; pretrained weights only from a local file."""
    if name == "small_cnn":
        if pretrained_path:
            raise ValueError("model.pretrained_path: small_cnn has no ImageNet weights")
        return SmallCNN(width)
    if name not in _TORCHVISION:
        raise ValueError(f"model.backbone: {name!r} is not one of {list(BACKBONE_NAMES)}")
    ctor, kind = _TORCHVISION[name]
    # Imported here: torchvision.models pulls in torch._dynamo (~3 s of CPU),
    # which every Ray worker of a small_cnn run would otherwise pay.
    import torchvision.models

    net = getattr(torchvision.models, ctor)(weights=None)  # never downloads
    if pretrained_path:
        load_pretrained(net, pretrained_path)
    return _TorchvisionTrunk(net, kind)
