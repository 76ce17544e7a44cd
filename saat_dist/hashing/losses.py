"""Benign deep-hashing losses, as in docs/method.md §2.

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


class CentreCodes:
    """One +-1 centre per class, and the centre of a multi-hot label: the sign
    of the sum of its classes' centres, zero bits broken by a fixed random
    centre (CSQ, DPN)."""

    def __init__(self, centres_CK: torch.Tensor, seed: int) -> None:
        self.centres = centres_CK.float()
        g = torch.Generator().manual_seed(seed + 1)
        self.tie_centre = torch.randint(0, 2, (centres_CK.shape[1],), generator=g).float() * 2 - 1

    def __call__(self, y_BC: torch.Tensor) -> torch.Tensor:
        summed = y_BC.float() @ self.centres.to(y_BC.device)
        tie = self.tie_centre.to(y_BC.device).expand_as(summed)
        return torch.sign(torch.where(summed == 0, tie, summed))


class CSQLoss:
    uses_bank = False
    needs_all_codes = False

    def __init__(self, num_classes: int, bits: int, quant_weight: float = 0.05, seed: int = 0) -> None:
        self._centre = CentreCodes(csq_centres(num_classes, bits, seed), seed)
        self.centres, self.tie_centre = self._centre.centres, self._centre.tie_centre
        self.quant_weight = quant_weight

    def centre_of(self, y_BC: torch.Tensor) -> torch.Tensor:
        return self._centre(y_BC)

    def __call__(self, u, y, bank_codes=None, bank_labels=None):
        c = self.centre_of(y)
        hash_term = F.binary_cross_entropy((u + 1) / 2, (c + 1) / 2)
        quant = self.quant_weight * (u.abs() - 1).pow(2).mean()
        return hash_term + quant, {"hash": hash_term, "quant": quant}

    def tanh_scale(self, step: int) -> float:
        return 1.0


def dpn_centres(num_classes: int, bits: int, seed: int = 0, p: float = 0.5) -> torch.Tensor:
    """DPN's class centres: +1 everywhere but a random ``p`` share of bits set to -1."""
    g = torch.Generator().manual_seed(seed)
    out = torch.ones(num_classes, bits)
    for c in range(num_classes):
        out[c, torch.randperm(bits, generator=g)[: int(bits * p)]] = -1
    return out


class DPNLoss:
    """Deep Polarized Network (IJCAI 2020): a hinge that pushes every bit of u
    past the margin m on the side of its label's centre, mean(max(0, m - u * t))."""

    uses_bank = False
    needs_all_codes = False

    def __init__(self, num_classes: int, bits: int, margin: float = 1.0, seed: int = 0) -> None:
        self.centre_of = CentreCodes(dpn_centres(num_classes, bits, seed), seed)
        self.margin = margin

    def __call__(self, u, y, bank_codes=None, bank_labels=None):
        hash_term = (self.margin - u * self.centre_of(y)).clamp_min(0).mean()
        return hash_term, {"hash": hash_term}

    def tanh_scale(self, step: int) -> float:
        return 1.0


def sliced_wasserstein_quantisation(u_BK: torch.Tensor) -> torch.Tensor:
    """HSWD's quantisation term: per bit, the 1-D Wasserstein-2 distance between
    the batch's values and as many draws from the +-1 Bernoulli(0.5) target,
    sum over bits / (B K). The draws come from torch's global CPU generator
    (part of every checkpoint), so a resumed run draws the same ones."""
    target = (torch.randint(0, 2, u_BK.shape).to(u_BK.device, u_BK.dtype) * 2 - 1)
    diff = torch.sort(u_BK, dim=0).values - torch.sort(target, dim=0).values
    return diff.pow(2).sum() / u_BK.numel()


class HSWDLoss(HashNetLoss):
    """HashNet with a sliced-Wasserstein quantisation term (Doan et al., CVPR
    2022, "One loss for quantization"): HashNet's weighted pairwise loss +
    0.1 x ``sliced_wasserstein_quantisation``; tanh scale grows as HashNet's."""

    def __init__(self, quant_weight: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quant_weight = quant_weight

    def __call__(self, u, y, bank_codes, bank_labels):
        hash_term, _ = super().__call__(u, y, bank_codes, bank_labels)
        quant = self.quant_weight * sliced_wasserstein_quantisation(u)
        return hash_term + quant, {"hash": hash_term, "quant": quant}


class OrthoLoss:
    """OrthoHash (Hoe et al., NeurIPS 2021, "One loss for all"): cosine
    similarity of batch-normalised codes to fixed random +-1 class codewords,
    an additive cosine margin m on the true classes, scale s, and cross
    entropy against the label spread evenly over its classes (one-hot labels:
    plain cross entropy). The reference's BatchNorm before the cosine has
    learnable scale/shift; here it normalises with batch statistics only."""

    uses_bank = False
    needs_all_codes = False

    def __init__(self, num_classes: int, bits: int, scale: float = 8.0, margin: float = 0.2, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.codebook = torch.randint(0, 2, (num_classes, bits), generator=g).float() * 2 - 1
        self.scale, self.margin = scale, margin

    def __call__(self, u, y, bank_codes=None, bank_labels=None):
        v = F.batch_norm(u, None, None, training=True) if len(u) > 1 else u
        cos = F.normalize(v, dim=1) @ F.normalize(self.codebook.to(u.device, u.dtype), dim=1).T
        logits = self.scale * (cos - self.margin * y.to(u.dtype))
        target = y.to(u.dtype) / y.sum(1, keepdim=True).clamp_min(1).to(u.dtype)
        hash_term = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
        return hash_term, {"hash": hash_term}

    def tanh_scale(self, step: int) -> float:
        return 1.0


LOSSES = ("dph", "dpsh", "hashnet", "csq", "dpn", "hswd", "ortho")


def build_hash_loss(name: str, num_classes: int, bits: int, seed: int = 0):
    if name == "dph":
        return DPHLoss()
    if name == "dpsh":
        return DPSHLoss()
    if name == "hashnet":
        return HashNetLoss()
    if name == "csq":
        return CSQLoss(num_classes, bits, seed=seed)
    if name == "dpn":
        return DPNLoss(num_classes, bits, seed=seed)
    if name == "hswd":
        return HSWDLoss()
    if name == "ortho":
        return OrthoLoss(num_classes, bits, seed=seed)
    raise ValueError(f"train.loss: {name!r} is not one of {list(LOSSES)}")
