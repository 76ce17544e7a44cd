"""Any ``nn.Module`` whose ``forward(x)`` returns K real-valued hash logits,
with the interface the library calls.

The library calls a hash model as ``model(x, alpha=a)`` -> codes
tanh(a * logits) in (-1, 1), fp32, with x images in [0, 1] (B x C x H x W);
``alpha=None`` means the model's own ``alpha`` attribute (1 at test time;
HashNet grows it during training). It reads ``model.logits(x)`` when present
(the finiteness check looks before the tanh) and ``model.bits`` when it needs
the code length. ``HashModel`` has all of it. ``as_hash_model`` gives a plain
module the same: the attacks, the defences' steps and the evaluation call it
at their entry, so a user's module works with each of them unchanged.

Contract of a plain module: ``forward(x)`` takes images in [0, 1] (it does
its own normalisation) and returns B x K real logits (not yet squashed; the
code is their sign). Its parameters are the adapter's (an optimizer over
either trains both), and the adapter starts in the module's own train/eval
mode, so an attack's ``model_mode`` restores the module as it found it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a forward without a readable signature (C extensions)
        return None


def has_hash_interface(module: nn.Module) -> bool:
    """Whether ``module`` is already called as ``module(x, alpha=...)``: its
    forward names ``alpha`` (``HashModel``, an adapter, a test's model), or it
    is a wrapper (DeepSpeed engine, DDP: forward(*args, **kwargs)) around such
    a model in ``.module`` (``torch.compile``'s: ``._orig_mod``)."""
    params = _forward_parameters(module)
    if params is None:
        return False
    if "alpha" in params:
        return True
    kinds = {p.kind for p in params.values()}
    wraps = kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
    return wraps and isinstance(inner, nn.Module) and inner is not module and has_hash_interface(inner)


class HashAdapter(nn.Module):
    """A plain logits module as a hash model (see the module docstring).
    ``bits``: the expected code length; every output is checked against it
    (``source`` names where the module came from in that error)."""

    def __init__(self, net: nn.Module, bits: int | None = None, source: str = "model") -> None:
        super().__init__()
        self.net = net
        self.bits = bits if bits is not None else getattr(net, "bits", None)
        self.alpha = 1.0  # default temperature; forward(alpha=...) overrides per call
        self.source = source
        self.training = net.training  # not train(): that would reset the mode of every submodule

    def _input_dtype(self) -> torch.dtype | None:
        for p in self.net.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def logits(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """The module's output, checked to be B x K (K = ``bits`` when known);
        the input is cast to the weights' dtype (a bf16 model takes fp32 images)."""
        dtype = self._input_dtype()
        z = self.net(x_BCHW if dtype is None else x_BCHW.to(dtype))
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x_BCHW.shape[0]:
            what = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{self.source}: forward(x) must return B x K hash logits for a batch of "
                             f"{x_BCHW.shape[0]}, got {what}")
        if self.bits is not None and z.shape[1] != self.bits:
            raise ValueError(f"{self.source}: forward(x) returns {z.shape[1]} columns, model.bits is {self.bits}")
        return z

    def forward(self, x_BCHW: torch.Tensor, alpha: float | None = None) -> torch.Tensor:
        """Codes tanh(alpha * logits) in (-1, 1), fp32 whatever the weights' dtype."""
        a = self.alpha if alpha is None else alpha
        return torch.tanh(a * self.logits(x_BCHW).float())


def as_hash_model(module: nn.Module, bits: int | None = None, source: str = "model") -> nn.Module:
    """``module`` itself when it has the hash-model interface, else a
    ``HashAdapter`` around it (cheap: no copy; call it at every entry)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{source}: expected a torch.nn.Module, got {type(module).__name__}")
    if has_hash_interface(module):
        return module
    return HashAdapter(module, bits, source)


def unwrap_adapter(model: nn.Module) -> nn.Module:
    """The user's module inside an adapter (whose state_dict keys a user's
    own weights file has), or ``model`` itself."""
    return model.net if isinstance(model, HashAdapter) else model
