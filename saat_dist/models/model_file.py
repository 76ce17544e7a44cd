"""The model section of a run config and the model-file format.

A model file is a state_dict with its format, backbone and code length,
written atomically and read with ``weights_only=True`` (files from elsewhere
are untrusted input). ``build_model`` gives the configured model with the
run's initial weights, the same on every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from saat_dist.checkpoint import CheckpointError, load_state, save_state
from saat_dist.models.hash_model import build_hash_model

MODEL_FORMAT = "saat-dist-model/1"


@dataclass
class ModelConfig:
    backbone: Literal["small_cnn", "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet50"] = "small_cnn"  # feature extractor
    bits: int = 32  # hash code length K
    pretrained_path: str | None = None  # local torchvision ImageNet weights; never downloaded
    hash_bn: bool = True  # BatchNorm1d on the hash logits (keeps DPH codes from collapsing); the reference has none (false)
    hash_init: Literal["torch", "reference"] = "torch"  # hash layer init: torch's Linear default, or the reference's (N(0, 0.01) weights and zero bias for ResNets, torch's default for AlexNet/VGG)
    width: int = 32  # channel width of small_cnn


def build_model(m: ModelConfig, seed: int, device) -> torch.nn.Module:
    """The configured hash model with the run's initial weights (the same on every process)."""
    torch.manual_seed(seed)
    model = build_hash_model(m.backbone, m.bits, m.pretrained_path, m.hash_bn, m.width, m.hash_init).to(device)
    if torch.device(device).type == "cuda":  # every backbone is convolutional: NHWC is faster on tensor cores
        model = model.to(memory_format=torch.channels_last)
    return model


def load_model(m: ModelConfig, seed: int, path: Path, device) -> torch.nn.Module:
    """A model file written by ``save_model``, checked against the model section."""
    state = load_state(path)
    if state.get("format") != MODEL_FORMAT or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a {MODEL_FORMAT} file")
    if state.get("backbone") != m.backbone or state.get("bits") != m.bits:
        raise CheckpointError(f"{path}: saved for {state.get('backbone')}/{state.get('bits')} bits, "
                              f"the config asks for {m.backbone}/{m.bits}")
    model = build_model(m, seed, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        raise CheckpointError(f"{path}: weights do not fit the configured model: {str(e)[:300]}") from e
    return model


def save_model(m: ModelConfig, path: Path, weights: dict, steps: int) -> None:
    save_state({"format": MODEL_FORMAT, "backbone": m.backbone, "bits": m.bits, "model": weights, "steps": steps}, path)
