"""``model.factory: "package.module:function"``: your own architecture.

Contract: ``function(**settings) -> nn.Module``. It is called with those of
the model section's settings its signature names (``bits``, ``width``,
``pretrained_path``, ``hash_bn``, ``hash_init``, ``backbone``; all of them if
it takes ``**kwargs``), after ``torch.manual_seed(seed)`` (every process
builds the same initial weights). The module it returns takes images in
[0, 1] (B x 3 x S x S, S = ``data.image_size``; it normalises them itself)
and returns B x ``model.bits`` real-valued hash logits; the library applies
tanh and alpha (``models.adapter``). A module whose forward already takes
``alpha`` (a ``HashModel``) is used as it is. The module must be importable
wherever the run works (every Ray worker): installed, or on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from saat_dist.models.adapter import as_hash_model

FACTORY_SETTINGS = ("bits", "width", "pretrained_path", "hash_bn", "hash_init", "backbone")


class FactoryError(ValueError):
    """``model.factory`` cannot build a fitting model; names the key and the function."""

    bad_input = True  # the CLI's exit status 2 (bad input), as a ConfigError


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """The function named by ``"package.module:function"`` (``function`` may be dotted: ``Class.build``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"model.factory: {spec!r} is not of the form 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise FactoryError(f"model.factory: cannot import {module_name!r} ({e}); it must be installed or on "
                           "PYTHONPATH") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"model.factory: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"model.factory: {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def factory_kwargs(fn: Callable, settings: dict) -> dict:
    """The settings ``fn``'s signature accepts (all of them with ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {"bits": settings["bits"]}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(settings)
    return {k: v for k, v in settings.items() if k in params}


def build_from_factory(spec: str, settings: dict, image_size: int | None = None) -> nn.Module:
    """The module ``spec`` builds, as a hash model of ``settings["bits"]``
    bits. With ``image_size``, one forward pass of two blank images checks the
    output's shape now (else every forward checks it)."""
    fn = resolve_factory(spec)
    try:
        module = fn(**factory_kwargs(fn, settings))
    except FactoryError:
        raise
    except Exception as e:  # the user's code: one line naming it (--debug shows the traceback)
        raise FactoryError(f"model.factory: {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(module, nn.Module):
        raise FactoryError(f"model.factory: {spec} returned a {type(module).__name__}, not a torch.nn.Module")
    model = as_hash_model(module, settings["bits"], source=f"model.factory {spec}")
    if image_size is not None:
        check_output(model, settings["bits"], image_size, f"model.factory: {spec}")
    return model


@torch.no_grad()
def check_output(model: nn.Module, bits: int, image_size: int, where: str) -> None:
    """One eval-mode forward of two blank images: B x ``bits`` finite-shaped codes, or a ``FactoryError``."""
    was = model.training
    model.eval()  # BatchNorm's running statistics stay untouched
    try:
        param = next(model.parameters(), None)
        x = torch.full((2, 3, image_size, image_size), 0.5, device=None if param is None else param.device)
        out = model(x, alpha=1.0)
    except FactoryError:
        raise
    except Exception as e:
        raise FactoryError(f"{where}: a forward pass of 2 x 3 x {image_size} x {image_size} images failed: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape != (2, bits):
        raise FactoryError(f"{where}: the model's output is {tuple(out.shape)}, model.bits needs (2, {bits})")
