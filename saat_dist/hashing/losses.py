"""Benign deep-hashing losses, as in SAAT.md §2.

Every loss is called as ``loss(u_BK, y_BC, bank_codes_NK, bank_labels_NC)`` and
returns ``(total, parts)`` with ``parts`` holding the named terms ("hash",
"quant"). Losses that compare a batch with the whole training set (DPH,
DPSH, HashNet) read the bank; CSQ compares with fixed hash centres and
ignores it (``uses_bank = False``). The caller writes the batch's own codes
into the bank before the call, as the reference code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def similarity(y_BC: torch.Tensor, labels_NC: torch.Tensor) -> torch.Tensor:
    """1 where two items share at least one label."""
    return ((y_BC.float() @ labels_NC.float().T) > 0).float()


class DPHLoss:
    """sum_ij (u_i . U_j / K - s_ij)^2 / (N B) with s = +-1.

    ``__call__`` is the O(B N K) formula over the bank's codes. ``from_stats``
    is the same loss (and gradient) from N-independent statistics: with
    G = sum_j U_j U_j^T (K x K) and S_l the code sums of label set l (L x K),
    sum_j (u . U_j / K - s_ij)^2 = u^T G u / K^2 - (2/K) u . sum_l s_il S_l + N,
    where s_il = +1 if label set l shares a label with y_i, else -1. The
    steps use it whenever the bank offers ``dph_stats()`` (``use_stats``).
    """

    uses_bank = True
    needs_all_codes = False  # from_stats reads only the Gram matrix and the table
    use_stats = True

    def __call__(self, u, y, bank_codes, bank_labels):
        n, k = bank_codes.shape
        s = 2 * similarity(y, bank_labels) - 1
        hash_term = ((u @ bank_codes.T) / k - s).pow(2).sum() / (n * len(u))
        return hash_term, {"hash": hash_term}

    def from_stats(self, u, y, gram, set_sums, set_labels, num_items: int):
        k = u.shape[1]
        u64 = u.to(torch.float64)  # the expansion cancels large terms: float64 keeps it exact
        sums = set_sums.to(u.device, torch.float64)
        relevant_BL = (y.to(torch.float64) @ set_labels.to(u.device, torch.float64).T > 0).to(torch.float64)
        pull_BK = 2 * (relevant_BL @ sums) - sums.sum(0)  # sum_j s_ij U_j
        quad = ((u64 @ gram.to(u.device, torch.float64)) * u64).sum() / k**2
        lin = (2.0 / k) * (u64 * pull_BK).sum()
        total = num_items * len(u)
        hash_term = ((quad - lin + total) / total).to(u.dtype)
        return hash_term, {"hash": hash_term}

    def tanh_scale(self, step: int) -> float:
        return 1.0


class DPSHLoss:
    uses_bank = True
    needs_all_codes = True  # non-linear in u . U_j: no N-independent form

    def __init__(self, eta: float = 50.0) -> None:
        self.eta = eta

    def __call__(self, u, y, bank_codes, bank_labels):
        n = bank_codes.shape[0]
        s = similarity(y, bank_labels)
        theta = (u @ bank_codes.T) / 2
        hash_term = -(s * theta - F.softplus(theta)).sum() / (n * len(u))
        quant = self.eta * (torch.sign(u) - u).pow(2).sum() / (n * len(u))
        return hash_term + quant, {"hash": hash_term, "quant": quant}

    def tanh_scale(self, step: int) -> float:
        return 1.0


class HashNetLoss:
    """Weighted logistic loss; positive and negative pairs re-balanced by count."""

    uses_bank = True
    needs_all_codes = True  # non-linear in u . U_j: no N-independent form

    def __init__(self, scale_every: int = 200, scale_rate: float = 0.005) -> None:
        self.scale_every = scale_every
        self.scale_rate = scale_rate

    def __call__(self, u, y, bank_codes, bank_labels):
        k = u.shape[1]
        s = similarity(y, bank_labels)
        theta = (10.0 / k) * (u @ bank_codes.T)
        nll = F.softplus(theta) - s * theta
        pos, neg = s > 0, s <= 0
        hash_term = u.new_zeros(())
        if pos.any():
            hash_term = hash_term + nll[pos].sum() / pos.sum()
        if neg.any():
            hash_term = hash_term + nll[neg].sum() / neg.sum()
        return hash_term, {"hash": hash_term}

    def tanh_scale(self, step: int) -> float:
        """The tanh temperature grows with training: (1 + 0.005 * it)^0.5, stepwise."""
        it = (step // self.scale_every) * self.scale_every
        return math.sqrt(1.0 + self.scale_rate * it)


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def csq_centres(num_classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """One +-1 centre per class: rows of [H; -H] when possible, else random."""
    if bits & (bits - 1) == 0 and 2 * bits >= num_classes:
        h = hadamard(bits)
        return torch.cat([h, -h], 0)[:num_classes]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (num_classes, bits), generator=g).float() * 2 - 1


class CSQLoss:
    uses_bank = False
    needs_all_codes = False

    def __init__(self, num_classes: int, bits: int, quant_weight: float = 0.05, seed: int = 0) -> None:
        self.centres = csq_centres(num_classes, bits, seed)
        g = torch.Generator().manual_seed(seed + 1)
        # Breaks zero bits of a multi-label centre sum, fixed for the run.
        self.tie_centre = torch.randint(0, 2, (bits,), generator=g).float() * 2 - 1
        self.quant_weight = quant_weight

    def centre_of(self, y_BC: torch.Tensor) -> torch.Tensor:
        summed = y_BC.float() @ self.centres.to(y_BC.device)
        tie = self.tie_centre.to(y_BC.device).expand_as(summed)
        summed = torch.where(summed == 0, tie, summed)
        return torch.sign(summed)

    def __call__(self, u, y, bank_codes=None, bank_labels=None):
        c = self.centre_of(y)
        hash_term = F.binary_cross_entropy((u + 1) / 2, (c + 1) / 2)
        quant = self.quant_weight * (u.abs() - 1).pow(2).mean()
        return hash_term + quant, {"hash": hash_term, "quant": quant}

    def tanh_scale(self, step: int) -> float:
        return 1.0


LOSSES = ("dph", "dpsh", "hashnet", "csq")


def build_hash_loss(name: str, num_classes: int, bits: int, seed: int = 0):
    if name == "dph":
        return DPHLoss()
    if name == "dpsh":
        return DPSHLoss()
    if name == "hashnet":
        return HashNetLoss()
    if name == "csq":
        return CSQLoss(num_classes, bits, seed=seed)
    raise ValueError(f"train.loss: {name!r} is not one of {list(LOSSES)}")
