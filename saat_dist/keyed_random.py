"""Random draws keyed by item: what a sample draws depends only on the
stream (seed, what, restart, step, ...) and the sample's own global index,
never on the batch it sits in, the worker that processes it, the number of
workers or the device.

A counter-based generator: element j of item i's draw is
SplitMix64(hash(stream, i) + (j + 1) * golden), computed with int64 tensor
arithmetic (wrapping, as two's complement) on the batch's device, so a CPU
and a GPU draw the same numbers. Uniform floats take the top 24 bits, which
float32 holds exactly.

``ItemKeys`` carries a stream key and a batch's item indices; attacks take
it where they used to take a ``torch.Generator`` (``keys=``), and
``ItemKeys.child(...)`` derives the stream of a restart or a step.
``keyed_normal`` (Box-Muller on keyed uniforms) gives Gaussian draws the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def splitmix64(x: int) -> int:
    """The SplitMix64 finaliser on a Python int (the reference for the tensor version)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def stream_key(*parts: int | str) -> int:
    """A 64-bit key of a tuple of ints and strings (strings hashed byte by
    byte, so the key is the same in every process: no Python ``hash``)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        if isinstance(p, str):
            for b in p.encode():
                h = splitmix64(h ^ b)
            h = splitmix64(h ^ 0xFF)  # end of string
        else:
            h = splitmix64(h ^ (int(p) & _MASK64))
    return h


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 on int64 tensors (the +golden step is the caller's)."""
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def keyed_bits(stream: int, items: torch.Tensor, count: int) -> torch.Tensor:
    """int64 B x count: 64 random bits per element, row i keyed by (stream, items[i])."""
    items = items.to(torch.int64)
    base = _mix(items * _signed(_GOLDEN) + _signed(stream))  # one key per item
    j = torch.arange(1, count + 1, dtype=torch.int64, device=items.device) * _signed(_GOLDEN)
    return _mix(base[:, None] + j[None, :])


def keyed_uniform(stream: int, items: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 B x *shape, uniform in [0, 1), row i keyed by (stream, items[i])."""
    n = 1
    for s in shape:
        n *= s
    bits = keyed_bits(stream, items, n)
    return (_srl(bits, 40).to(torch.float32) * 2.0**-24).view(len(items), *shape)


def keyed_normal(stream: int, items: torch.Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """B x *shape standard normals, row i keyed by (stream, items[i]).

    Box-Muller in float64 on pairs of 53-bit uniforms (elements 2i and 2i + 1
    are r cos t and r sin t of draws 2i and 2i + 1, so an element does not
    depend on the shape's size), then cast to ``dtype`` once. u1 lies in
    (0, 1]: no log(0); the tails stop at |z| = sqrt(2 ln 2^53) ~ 8.6, a change
    of probability below 1e-17. CPU and GPU agree up to the last bit of
    float64 log/cos/sin."""
    n = 1
    for s in shape:
        n *= s
    pairs = (n + 1) // 2
    bits = _srl(keyed_bits(stream, items, 2 * pairs), 11).view(len(items), pairs, 2)
    radius = torch.sqrt(-2 * torch.log((bits[..., 0].to(torch.float64) + 1) * 2.0**-53))
    angle = (2 * torch.pi * 2.0**-53) * bits[..., 1].to(torch.float64)
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).view(len(items), 2 * pairs)
    return z[:, :n].to(dtype).reshape(len(items), *shape)


def keyed_randint(stream: int, items: torch.Tensor, high: int | torch.Tensor, count: int = 1) -> torch.Tensor:
    """int64 B x count in [0, high) (``high`` a number or one per item), row i keyed by (stream, items[i])."""
    bits = _srl(keyed_bits(stream, items, count), 11)  # 53 bits: the modulo bias is below 2^-30 for high < 2^23
    high = torch.as_tensor(high, dtype=torch.int64, device=bits.device)
    return bits % (high.view(-1, 1) if high.dim() else high)


@dataclass(frozen=True)
class ItemKeys:
    """The keys of one batch's random draws: a stream and the items' global indices.

    ``uniform(shape)`` (``normal(shape)``) gives each row its own draw; ``child(*parts)`` the keys
    of a sub-stream (a restart, a step, a neighbour); ``select(mask)`` the
    rows of a part of the batch (each keeps its draws).
    """

    stream: int
    items: torch.Tensor

    @classmethod
    def of(cls, items: torch.Tensor, *parts: int | str) -> "ItemKeys":
        return cls(stream_key(*parts), items.detach().to(torch.int64))

    def child(self, *parts: int | str) -> "ItemKeys":
        return ItemKeys(stream_key(self.stream, *parts), self.items)

    def select(self, mask: torch.Tensor) -> "ItemKeys":
        return ItemKeys(self.stream, self.items[mask.to(self.items.device)])

    def to(self, device) -> "ItemKeys":
        return ItemKeys(self.stream, self.items.to(device))

    def uniform(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        return keyed_uniform(self.stream, self.items.to(device) if device is not None else self.items, shape)

    def normal(self, shape: tuple[int, ...], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return keyed_normal(self.stream, self.items.to(device) if device is not None else self.items, shape, dtype)

    def randint(self, high, count: int = 1, device=None) -> torch.Tensor:
        return keyed_randint(self.stream, self.items.to(device) if device is not None else self.items, high, count)
