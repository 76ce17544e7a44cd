"""Certified robustness of hash codes by center smoothing (Kumar & Goldstein,
"Center Smoothing: Certified Robustness for Networks with Structured
Outputs", NeurIPS 2021, arXiv 2102.09701).

Follows the authors' code, github.com/aounon/center-smoothing at commit
8f801c9cfe9e1801b0619984221e9fbfd63579be (``center_smoothing.py``:
``Smooth.compute_center``, ``meb``, ``pts_in_nbd``, ``certify``), with the
output space {-1, +1}^K under the Hamming distance.

The smoothed code of x (``smoothed_codes``):
1. n1 = ``n_center`` codes sign(F(x + N(0, sigma^2 I))); the center is the
   sample with the smallest median Hamming distance to all n1 samples (itself
   included), the earliest on ties (the reference's ``meb``); r_hat is that
   median. A point of the samples is a beta = 2 approximation of the minimum
   enclosing ball of half the mass (triangle inequality).
2. n1 fresh codes: p_hat = the fraction within r_hat of the center.
   Delta_1 = sqrt(ln(2 / alpha_1) / (2 n1)), Delta_2 = 1/2 - (p_hat - Delta_1);
   abstain when max(Delta_1, Delta_2) > Delta (the reference: Delta = 0.05).
The certificate (``certify``), for an l2 input radius eps:
3. n2 = ``n_certify`` fresh codes, their distances to the center; the level
   q = Phi(Phi^-1(1/2 + Delta) + eps / sigma) + sqrt(ln(1 / alpha_2) / (2 n2));
   q > 1 abstains at that radius. R_hat = the smallest distance with at least
   q n2 of the samples within it (the empirical q-quantile, order statistic
   ceil(q n2); the reference's ``np.quantile`` interpolates, which can land a
   little below it); the certified Hamming radius is floor((1 + beta) R_hat)
   = 3 R_hat (the reference's ``radius_coeff``), capped at K: for every x'
   with ||x' - x||_2 <= eps, d(center(x), center(x')) <= that radius, with
   probability >= 1 - alpha_1 - alpha_2 over the draws. The one-sided margin
   is also the one-sided DKW bound (Massart) uniformly over levels, so one set
   of n2 samples serves every radius of ``radii`` at once.
alpha (``alpha``) is split in halves, alpha_1 = alpha_2 (the reference:
0.005 each).

Random draws are keyed (``saat_dist.keyed_random``): draw d of a query is a
function of (seed, the query's global index, phase, d) only, and each query's
draws go through forwards of that query alone, so a query's center and radius
do not depend on its batch, the chunking or the worker (tested).

Floating point (Voracek & Hein, "Sound randomized smoothing in floating-point
arithmetics", ICLR 2023): x + noise is rounded to float32, so the smoothing
distribution is a rounded Gaussian whose support depends on x; a base model
built to read that can make certificates of the real-arithmetic analysis
false. What is done here is only the cheap part: the noise is computed in
float64 from 53-bit uniforms, added to x in float64 and rounded to float32
once, so x + noise is the correctly rounded value of the exact sum. Sign
codes do not shrink the exposure (they are as discrete as class labels).
The certificates are therefore sound for the real-arithmetic smoothed model,
not proven for its float32 implementation: ``Certificate.float_sound`` is
False and ``float_note`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import nn

from saat_dist.attacks.mainstay_pgd import model_mode
from saat_dist.attacks.smoothed_l2 import smoothed_l2_attack
from saat_dist.certify_settings import CertifyConfig
from saat_dist.keyed_random import ItemKeys, keyed_bits
from saat_dist.models.adapter import as_hash_model

BETA = 2.0  # the sample-median center is a 2-approximation of the minimum enclosing ball (any metric)
NOISE_ELEMENTS = 2**22  # Gaussian draws per noise chunk: keeps the int64 temporaries near 32 MiB each
FLOAT_NOTE = ("not proven for float32 (Voracek & Hein, ICLR 2023): x + noise is rounded once to float32 "
              "from a float64 sum, so the smoothing distribution is a rounded Gaussian; the certificate is "
              "that of the real-arithmetic analysis")
_PHI = NormalDist()


def linf_equivalent(radius_l2: float, dims: int) -> float:
    """The L-inf radius whose ball lies inside the l2 ball of ``radius_l2`` in
    ``dims`` dimensions: radius / sqrt(d) (an l2 certificate covers it)."""
    return radius_l2 / math.sqrt(dims)


# ---------------------------------------------------------------- noisy codes
def draw_keys(keys: ItemKeys, row: int, start: int, count: int) -> ItemKeys:
    """Keys of draws ``start .. start + count - 1`` of query ``row``: one row
    per (query, draw), keyed by the query's global index and the draw number."""
    base = keyed_bits(keys.stream, keys.items[row : row + 1], 1)[0, 0]
    draws = keys.child("draws")
    return ItemKeys(draws.stream, base + torch.arange(start, start + count, dtype=torch.int64,
                                                      device=keys.items.device))


def noisy_inputs(x_CHW: torch.Tensor, sigma: float, keys: ItemKeys) -> torch.Tensor:
    """len(keys.items) x C x H x W: x + sigma z, summed in float64 and rounded
    once to x's dtype (see the module docstring on floating point)."""
    shape = tuple(x_CHW.shape)
    rows = max(1, NOISE_ELEMENTS // x_CHW.numel())
    x64 = x_CHW.to(torch.float64)
    out = []
    for s in range(0, len(keys.items), rows):
        part = ItemKeys(keys.stream, keys.items[s : s + rows])
        z = part.normal(shape, device=x_CHW.device, dtype=torch.float64)
        out.append((x64 + sigma * z).to(x_CHW.dtype))
    return torch.cat(out)


def noisy_bits(model: nn.Module, x_CHW: torch.Tensor, n: int, keys: ItemKeys, row: int, cfg: CertifyConfig
               ) -> torch.Tensor:
    """n x K bool (True = +1, a zero output maps to +1 as ``encode``) on the
    CPU: the codes of n noisy copies of query ``row``, ``cfg.batch_size`` per
    forward. The model is called as is (eval mode and no_grad are the caller's)."""
    out = []
    for s in range(0, n, cfg.batch_size):
        c = min(cfg.batch_size, n - s)
        xn = noisy_inputs(x_CHW, cfg.sigma, draw_keys(keys, row, s, c))
        out.append((model(xn, alpha=1.0) >= 0).cpu())
    return torch.cat(out)


def distances_to(bits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Hamming distances (int64) of n x K bool codes to one K bool code."""
    return (bits != center).sum(1)


def sample_center(bits: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, float]:
    """(the sample with the smallest median Hamming distance to all samples,
    that median): the reference's ``meb``, itself included in the median
    (``np.median``: the mean of the two middle values when n is even), the
    earliest sample on ties. Works on the distinct codes with their counts, so
    it costs U^2 for U distinct codes, not n^2."""
    n, k = bits.shape
    uniq, inverse, counts = torch.unique(bits, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(uniq),), n, dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(n), "amin")
    signs = uniq.to(torch.float32) * 2 - 1  # sums of +-1 are exact in float32 for K < 2^24
    lo_rank, hi_rank = (n - 1) // 2, n // 2
    medians = torch.empty(len(uniq), dtype=torch.float64)
    for s in range(0, len(uniq), block):
        d = ((k - signs[s : s + block] @ signs.T) / 2).round().to(torch.int64)
        hist = torch.zeros(len(d), k + 1, dtype=torch.int64).scatter_add_(1, d, counts.expand(len(d), -1))
        cum = hist.cumsum(1)
        # order statistic r (0-based) = the smallest distance with more than r values at or below it
        medians[s : s + block] = ((cum <= lo_rank).sum(1) + (cum <= hi_rank).sum(1)).to(torch.float64) / 2
    best = medians.min()
    tied = torch.nonzero(medians == best).flatten()
    pick = tied[first[tied].argmin()]
    return uniq[pick], float(best)


# ---------------------------------------------------------------- the smoothed code
@dataclass
class Centers:
    """The smoothed codes of a batch: ``codes`` B x K (+-1 float, CPU), and
    per query whether it abstained, r_hat (the center's median distance) and
    p_hat (the fresh samples' fraction within r_hat)."""

    codes: torch.Tensor
    abstained: torch.Tensor
    median_radius: torch.Tensor
    p_hat: torch.Tensor
    forwards_per_query: int


def find_centers(model: nn.Module, x_BCHW: torch.Tensor, cfg: CertifyConfig, keys: ItemKeys) -> Centers:
    """Steps 1-2 of the module docstring for every query of the batch
    (draws from ``keys.child("center")`` and ``keys.child("check")``)."""
    model = as_hash_model(model)
    center_keys, check_keys = keys.child("center"), keys.child("check")
    codes, abstained, radius, p_hat = [], [], [], []
    with torch.no_grad(), model_mode(model, "eval"):
        for q in range(len(x_BCHW)):
            center, r_hat = sample_center(noisy_bits(model, x_BCHW[q], cfg.n_center, center_keys, q, cfg))
            fresh = noisy_bits(model, x_BCHW[q], cfg.n_center, check_keys, q, cfg)
            p = float((distances_to(fresh, center) <= r_hat).sum()) / cfg.n_center
            delta_2 = 0.5 - (p - cfg.margin_center)
            codes.append(center.to(torch.float32) * 2 - 1)
            abstained.append(max(cfg.margin_center, delta_2) > cfg.delta)
            radius.append(r_hat)
            p_hat.append(p)
    bits = torch.stack(codes) if codes else torch.zeros(0, 0)
    return Centers(bits, torch.tensor(abstained, dtype=torch.bool), torch.tensor(radius, dtype=torch.float64),
                   torch.tensor(p_hat, dtype=torch.float64), 2 * cfg.n_center)


def smoothed_codes(model: nn.Module, x_BCHW: torch.Tensor, cfg: CertifyConfig, keys: ItemKeys
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(center codes B x K in +-1, abstain mask B) of center smoothing."""
    c = find_centers(model, x_BCHW, cfg, keys)
    return c.codes, c.abstained


# ---------------------------------------------------------------- the certificate
@dataclass
class Certificate:
    """What ``certify`` gives for a batch of queries (tensors on the CPU).

    ``hamming_radius`` B x len(radii) (float64): the certified Hamming radius
    of the center at each l2 radius; inf where the query abstained (its
    center step, or a level above 1 at that radius).
    """

    center: torch.Tensor
    abstained: torch.Tensor
    hamming_radius: torch.Tensor
    radii: list[float]
    levels: list[float]
    linf: list[float]
    median_radius: torch.Tensor
    p_hat: torch.Tensor
    base_distance: torch.Tensor  # Hamming distance of the center to the unsmoothed code of x
    sigma: float
    n_center: int
    n_certify: int
    alpha: float
    alpha_center: float
    alpha_certify: float
    delta: float
    beta: float
    forwards_per_query: int
    float_sound: bool = False
    float_note: str = FLOAT_NOTE

    @property
    def certified(self) -> torch.Tensor:
        """B x len(radii): a finite certificate (no abstention)."""
        return torch.isfinite(self.hamming_radius)

    def summary(self) -> dict:
        """JSON-able: per radius the certified fraction and the radii's
        median over certified queries; the settings; the floating-point note."""
        per_radius = []
        for i, eps in enumerate(self.radii):
            r = self.hamming_radius[:, i]
            ok = torch.isfinite(r)
            per_radius.append({
                "radius_l2": eps, "linf_equivalent": self.linf[i], "level": self.levels[i],
                "certified": int(ok.sum()), "queries": len(r),
                "median_hamming_radius": float(r[ok].median()) if ok.any() else None,
                "max_hamming_radius": float(r[ok].max()) if ok.any() else None,
            })
        return {"radii": per_radius, "abstained_center": int(self.abstained.sum()),
                "sigma": self.sigma, "n_center": self.n_center, "n_certify": self.n_certify,
                "alpha": self.alpha, "alpha_center": self.alpha_center, "alpha_certify": self.alpha_certify,
                "delta": self.delta, "beta": self.beta, "forwards_per_query": self.forwards_per_query,
                "float_sound": self.float_sound, "float_note": self.float_note}


def certificate_radius(dist: torch.Tensor, level: float, bits: int) -> float:
    """floor((1 + beta) R_hat) capped at K, R_hat the smallest distance with
    at least ``level`` of the samples within it; inf when level > 1."""
    if level > 1.0:
        return math.inf
    cum = torch.bincount(dist, minlength=bits + 1).cumsum(0).to(torch.float64)
    r_hat = int((cum < level * len(dist)).sum())  # the first distance whose count reaches level * n
    return float(min(bits, math.floor((1 + BETA) * r_hat)))


def certify(model: nn.Module, x_BCHW: torch.Tensor, index: torch.Tensor, cfg: CertifyConfig, *,
            seed: int = 0) -> Certificate:
    """Center smoothing of each query and its certified Hamming radius at
    every l2 radius of ``cfg.radii`` (see the module docstring). ``index``:
    the queries' global indices (they key the draws, with ``seed``)."""
    model = as_hash_model(model)
    keys = ItemKeys.of(index, seed, "certify").to(x_BCHW.device)
    centers = find_centers(model, x_BCHW, cfg, keys)
    levels = [cfg.level(eps) for eps in cfg.radii]
    cert_keys = keys.child("certify")
    radii, base = [], []
    with torch.no_grad(), model_mode(model, "eval"):
        for q in range(len(x_BCHW)):
            center = centers.codes[q] > 0
            base.append(int(distances_to((model(x_BCHW[q : q + 1], alpha=1.0) >= 0).cpu(), center)[0]))
            if centers.abstained[q]:
                radii.append([math.inf] * len(levels))
                continue
            dist = distances_to(noisy_bits(model, x_BCHW[q], cfg.n_certify, cert_keys, q, cfg), center)
            radii.append([certificate_radius(dist, lv, len(center)) for lv in levels])
    dims = x_BCHW[0].numel() if len(x_BCHW) else 0
    return Certificate(
        center=centers.codes, abstained=centers.abstained,
        hamming_radius=torch.tensor(radii, dtype=torch.float64).view(len(x_BCHW), len(levels)),
        radii=list(cfg.radii), levels=levels, linf=[linf_equivalent(eps, dims) if dims else math.nan
                                                    for eps in cfg.radii],
        median_radius=centers.median_radius, p_hat=centers.p_hat,
        base_distance=torch.tensor(base, dtype=torch.int64), sigma=cfg.sigma, n_center=cfg.n_center,
        n_certify=cfg.n_certify, alpha=cfg.alpha, alpha_center=cfg.alpha_center,
        alpha_certify=cfg.alpha_certify, delta=cfg.delta, beta=BETA, forwards_per_query=cfg.forwards_per_query)


# ---------------------------------------------------------------- the empirical check
@dataclass
class AttackCheck:
    """One l2 radius of ``attack_check``, per attacked (certified) query: the
    Hamming move of its smoothed code, its certified radius, and whether the
    smoothed model abstained at x + delta (no output there, so no violation)."""

    radius_l2: float
    moves: torch.Tensor
    certified_radius: torch.Tensor
    adv_abstained: torch.Tensor
    max_delta_l2: float

    @property
    def attacked(self) -> int:
        return len(self.moves)

    @property
    def violations(self) -> int:
        """Queries moved farther than certified (must be 0)."""
        return int(((self.moves > self.certified_radius) & ~self.adv_abstained).sum())

    @property
    def max_move(self) -> int:
        valid = self.moves[~self.adv_abstained]
        return int(valid.max()) if len(valid) else 0

    def summary(self) -> dict:
        valid = ~self.adv_abstained
        return {"radius_l2": self.radius_l2, "attacked": self.attacked, "violations": self.violations,
                "adv_abstained": int(self.adv_abstained.sum()), "max_move": self.max_move,
                "max_certified_radius": float(self.certified_radius[valid].max()) if valid.any() else None,
                "max_excess": float((self.moves - self.certified_radius)[valid].max()) if valid.any() else None,
                "max_delta_l2": self.max_delta_l2}


def attack_check(model: nn.Module, x_BCHW: torch.Tensor, index: torch.Tensor, cfg: CertifyConfig,
                 certified: Certificate, *, seed: int = 0) -> list[AttackCheck]:
    """Attack every certified query at each radius (``smoothed_l2_attack``:
    l2 PGD on the smoothed code, ``attack_iters`` steps of ``attack_samples``
    noise draws), recompute the smoothed code of x + delta with fresh keyed
    draws, and count the queries whose code moved farther than certified.

    Lives here, not in ``attacks``, because it needs the smoothing (the
    evaluation layer sits above the attacks)."""
    if cfg.sigma != certified.sigma:
        raise ValueError(f"attack_check: cfg.sigma={cfg.sigma} but the certificate was made with {certified.sigma}")
    out = []
    for i, eps in enumerate(certified.radii):
        ok = torch.isfinite(certified.hamming_radius[:, i])
        sel = torch.nonzero(ok).flatten()
        if len(sel) == 0:
            out.append(AttackCheck(eps, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64),
                                   torch.zeros(0, dtype=torch.bool), 0.0))
            continue
        x = x_BCHW[sel.to(x_BCHW.device)]
        center = certified.center[sel]
        keys = ItemKeys.of(index[sel.to(index.device)], seed, "certify", "attack", i).to(x.device)
        x_adv = smoothed_l2_attack(model, x, center.to(x.device), eps=eps, iters=cfg.attack_iters,
                                   samples=cfg.attack_samples, sigma=cfg.sigma, keys=keys.child("pgd"))
        adv = find_centers(model, x_adv, cfg, keys.child("smooth"))
        out.append(AttackCheck(eps, (adv.codes != center).sum(1), certified.hamming_radius[sel, i], adv.abstained,
                               float((x_adv - x).flatten(1).norm(dim=1).max())))
    return out
