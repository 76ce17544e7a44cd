"""torch's Adam and SGD, without importing ``torch._dynamo`` when nothing compiles.

Every ``torch.optim.Optimizer`` imports ``torch._dynamo`` at its first
``step`` (to mark a graph break) and at its first ``add_param_group``,
``zero_grad``, ``state_dict`` or ``load_state_dict`` (to keep Dynamo out of
them): ~2.3 CPU-seconds in every process that trains or attacks (each Ray
worker, each CLI run; measured with ``-X importtime``: a third of a
one-epoch tiny train), though nothing here compiles. ``Adam`` and ``SGD``
here are torch's classes, their update the same code, with those wrappers
replaced by ones that do the same once ``torch._dynamo`` is loaded and
nothing before: Dynamo can trace only when it is, and a graph break
outside a trace does nothing. ``isinstance(opt, torch.optim.Adam)`` holds;
ZeRO, which names the optimizers it has tested by exact type, is told
``Adam`` is one (``distributed/deepspeed_setup.py``). ``tests/test_training.py``
checks they step as torch's to the bit, with Dynamo loaded and in a fresh
process without it, and import nothing.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch._compile


def _dynamo():
    """``torch._dynamo`` if something loaded it, else None (never imports it)."""
    if "torch._dynamo" not in sys.modules:
        return None
    import torch._dynamo  # loaded, or being loaded by another thread: this waits until it is whole

    return torch._dynamo


def _disabled_when_dynamo_is_loaded(fn):
    """``torch._disable_dynamo(fn)`` (what ``Optimizer`` wraps its
    methods in) that imports nothing: Dynamo's ``disable`` once loaded."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            if _dynamo() is None:  # nothing can be tracing
                return fn(*args, **kwargs)
            disabled = _dynamo().disable(fn, recursive=True, wrapping=False)
        return disabled(*args, **kwargs)

    return call


def _grad_mode_step(step):
    """torch's ``_use_grad_for_differentiable``: the step under the grad
    mode of ``defaults["differentiable"]``, between graph breaks when Dynamo
    is loaded."""

    @functools.wraps(step)
    def call(self, *args, **kwargs):
        previous = torch.is_grad_enabled()
        dynamo = _dynamo()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            if dynamo is not None:
                dynamo.graph_break()
            return step(self, *args, **kwargs)
        finally:
            if dynamo is not None:
                dynamo.graph_break()
            torch.set_grad_enabled(previous)

    return call


# the wrappers torch 2.14 puts around these methods: _disable_dynamo's, the
# step's grad mode (_use_grad_for_differentiable) and its profiling hook
# (Optimizer.profile_hook_step, added at a class's first instance)
_OPTIMIZER_FILE = inspect.getfile(torch.optim.Optimizer)
_KNOWN_WRAPPERS = {(torch._compile.__file__, "inner"), (_OPTIMIZER_FILE, "_use_grad"), (_OPTIMIZER_FILE, "wrapper")}


def _unwrapped(cls: type, name: str):
    """The function torch wrapped as ``cls.name``; None where any wrapper
    around it is not one of today's (then torch's method is kept as it is)."""
    layer, layers = getattr(cls, name), 0
    while hasattr(layer, "__wrapped__"):
        code = getattr(layer, "__code__", None)
        if code is None or (code.co_filename, code.co_name) not in _KNOWN_WRAPPERS:
            return None
        layer, layers = layer.__wrapped__, layers + 1
    code = getattr(layer, "__code__", None)
    return layer if layers and code is not None and code.co_name == name else None


def _without_dynamo_import(cls: type) -> type:
    attrs = {"__doc__": f"torch.optim.{cls.__name__}, importing torch._dynamo only when something compiles "
                        f"(saat_dist.optimizers)", "__module__": __name__}
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        if (inner := _unwrapped(torch.optim.Optimizer, name)) is not None:
            attrs[name] = _disabled_when_dynamo_is_loaded(inner)
    if (step := _unwrapped(cls, "step")) is not None:
        attrs["step"] = _grad_mode_step(step)
    return type(cls.__name__, (cls,), attrs)


Adam = _without_dynamo_import(torch.optim.Adam)
SGD = _without_dynamo_import(torch.optim.SGD)
