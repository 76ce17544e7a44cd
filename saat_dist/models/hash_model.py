"""The hash model F(x; alpha) = tanh(alpha * h(norm(x))).

ImageNet normalisation happens inside the model so that attacks work in pixel
space [0, 1]. ``alpha`` is a temperature: 1 at test time; attacks anneal it
and HashNet grows it during training.
"""

from __future__ import annotations

import torch
from torch import nn

from saat_dist.models.backbones import BACKBONE_NAMES, build_backbone

BACKBONES = BACKBONE_NAMES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HashModel(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, bits: int, hash_bn: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        # BatchNorm on the hash logits keeps codes from collapsing to 0 with
        # DPH-style losses (docs/method.md §2, practical note). A bias in front of it
        # would do nothing (BatchNorm subtracts the mean) but collect rounding
        # noise as its gradient, which Adam turns into lr-sized random steps
        # that make runs differ across CPUs and thread counts.
        self.hash_layer = nn.Linear(feature_dim, bits, bias=not hash_bn)
        self.hash_bn = nn.BatchNorm1d(bits) if hash_bn else nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.bits = bits
        self.alpha = 1.0  # default temperature; forward(alpha=...) overrides per call

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also loads files of models that had a bias before the hash BatchNorm
        (saat-dist 0.1): the bias folds into the running mean, which gives the
        same eval-mode output (in train mode BatchNorm removes it anyway)."""
        bias = state_dict.get("hash_layer.bias")
        if bias is not None and self.hash_layer.bias is None and "hash_bn.running_mean" in state_dict:
            state_dict = dict(state_dict)
            state_dict.pop("hash_layer.bias")
            state_dict["hash_bn.running_mean"] = state_dict["hash_bn.running_mean"] - bias.to(
                state_dict["hash_bn.running_mean"].dtype)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def logits(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """h(norm(x)) before tanh; x in [0, 1]. The input is cast to the
        weights' dtype (a bf16 model takes fp32 images, and input gradients
        flow back to them in fp32)."""
        x = ((x_BCHW - self.mean) / self.std).to(self.hash_layer.weight.dtype)
        return self.hash_bn(self.hash_layer(self.backbone(x)))

    def forward(self, x_BCHW: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """Codes in (-1, 1), fp32 whatever the weights' dtype (losses and
        attacks compute in fp32)."""
        a = self.alpha if alpha is None else alpha
        return torch.tanh(a * self.logits(x_BCHW).float())


HASH_INITS = ("torch", "reference")


def build_hash_model(
    backbone: str, bits: int, pretrained_path: str | None = None, hash_bn: bool = True, width: int = 32,
    hash_init: str = "torch",
) -> HashModel:
    """``hash_init``: ``torch`` keeps nn.Linear's default initialisation of the
    hash layer; ``reference`` initialises it as the SAAT reference code does:
    N(0, 0.01) weights and a zero bias on ResNets, nn.Linear's default on
    AlexNet and VGG (there the two agree)."""
    if hash_init not in HASH_INITS:
        raise ValueError(f"model.hash_init: {hash_init!r} is not one of {list(HASH_INITS)}")
    net = build_backbone(backbone, pretrained_path, width)
    model = HashModel(net, net.out_dim, bits, hash_bn)
    if hash_init == "reference" and backbone.startswith("resnet"):
        with torch.no_grad():
            model.hash_layer.weight.normal_(0, 0.01)
            if model.hash_layer.bias is not None:
                model.hash_layer.bias.zero_()
    return model
