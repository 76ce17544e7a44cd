"""The model section of a run config and the model-file format.

A model file is a state_dict with its format, backbone (or factory) and
code length, written atomically and read with ``weights_only=True`` (files
from elsewhere are untrusted input). ``build_model`` gives the configured
model with the run's initial weights, the same on every process: a built-in
backbone's ``HashModel``, or the module of ``model.factory``
(``models.factory``) as a hash model. ``load_weights_file`` reads a user's
own state_dict (``saat-dist evaluate --model-file``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from saat_dist.checkpoint import CheckpointError, load_state, save_state
from saat_dist.config_fields import section
from saat_dist.models.adapter import unwrap_adapter
from saat_dist.models.factory import FACTORY_SETTINGS, build_from_factory
from saat_dist.models.hash_model import build_hash_model

MODEL_FORMAT = "saat-dist-model/1"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_PATTERN = rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$"  # package.module:function (or Class.build)


@section
class ModelConfig:
    """The hash model: a built-in backbone, or your own architecture (factory)."""

    backbone: Annotated[Literal["small_cnn", "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet50"], Field(
        description="feature extractor")] = "small_cnn"
    bits: Annotated[int, Field(ge=8, le=1024, description="hash code length K")] = 32
    pretrained_path: Annotated[str | None, Field(
        description="local torchvision ImageNet weights; never downloaded")] = None
    hash_bn: Annotated[bool, Field(description=(
        "BatchNorm1d on the hash logits (keeps DPH codes from collapsing); the reference has none (false)"))] = True
    hash_init: Annotated[Literal["torch", "reference"], Field(description=(
        "hash layer init: torch's Linear default, or the reference's (N(0, 0.01) weights and zero bias for "
        "ResNets, torch's default for AlexNet/VGG)"))] = "torch"
    width: Annotated[int, Field(ge=1, description="channel width of small_cnn")] = 32
    factory: Annotated[str | None, Field(json_schema_extra={"pattern": FACTORY_PATTERN}, description=(
        "your own architecture: 'package.module:function' returning an nn.Module whose forward(x) gives "
        "model.bits hash logits (null: the built-in backbone)"))] = None

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, spec: str | None) -> str | None:
        if spec is not None and not re.fullmatch(FACTORY_PATTERN, spec):
            raise ValueError(f"expected 'package.module:function' (a dotted module path, a colon and a function "
                             f"name), got {spec!r}")
        return spec


def factory_of(m: ModelConfig) -> str | None:
    """``model.factory`` (None: the built-in backbone)."""
    return getattr(m, "factory", None)


def build_model(m: ModelConfig, seed: int, device, image_size: int | None = None) -> torch.nn.Module:
    """The configured hash model with the run's initial weights (the same on
    every process). ``image_size``: check a factory's output shape now."""
    torch.manual_seed(seed)
    factory = factory_of(m)
    if factory:
        settings = {k: getattr(m, k) for k in FACTORY_SETTINGS if hasattr(m, k)}
        return build_from_factory(factory, settings, image_size).to(device)
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
    if state.get("factory") != factory_of(m):
        raise CheckpointError(f"{path}: saved for model.factory {state.get('factory')!r}, "
                              f"the config has {factory_of(m)!r}")
    model = build_model(m, seed, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        raise CheckpointError(f"{path}: weights do not fit the configured model: {str(e)[:300]}") from e
    return model


def save_model(m: ModelConfig, path: Path, weights: dict, steps: int) -> None:
    factory = {"factory": factory_of(m)} if factory_of(m) else {}  # files of built-in backbones stay as they were
    save_state({"format": MODEL_FORMAT, "backbone": m.backbone, "bits": m.bits, **factory, "model": weights,
                "steps": steps}, path)


def load_weights_file(m: ModelConfig, seed: int, path: str | Path, device) -> torch.nn.Module:
    """The configured model with the weights of a user's file, read as
    untrusted input: ``weights_only=True``; a mapping of str -> tensor (or
    one under ``"state_dict"``), finite, whose keys and shapes are those of
    the configured model (of the factory's own module: its own state_dict's
    keys). A ``save_model`` file is read by ``load_model``. Every refusal is
    a ``CheckpointError`` naming the file and the first bad key."""
    path = Path(path)
    state = load_state(path)
    if state.get("format") == MODEL_FORMAT:
        return load_model(m, seed, path, device)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = build_model(m, seed, device)
    own = unwrap_adapter(model).state_dict()
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is a {type(key).__name__}, a state_dict's keys are str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key}: expected a tensor, found {type(value).__name__}")
        if key not in own:
            raise CheckpointError(f"{path}: {key}: not a key of the configured model "
                                  f"({len(own)} keys, e.g. {next(iter(own), None)!r})")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{path}: {key}: shape {tuple(value.shape)}, the configured model has "
                                  f"{tuple(own[key].shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {key}: holds NaN or infinite values")
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{path}: {missing[0]}: missing ({len(missing)} keys of the configured model missing)")
    unwrap_adapter(model).load_state_dict(state)
    return model
