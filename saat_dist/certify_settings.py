"""The settings of ``saat-dist certify`` (``evaluation.center_smoothing``),
apart from the smoothing itself so that ``saat_dist.config`` can hold them
without importing the evaluation layer."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated, Literal

from pydantic import Field

from saat_dist.config_fields import field as section_field
from saat_dist.config_fields import section

_PHI = NormalDist()


@section
class CertifyConfig:
    """Center smoothing of the hash code and its certificate (Kumar & Goldstein,
    NeurIPS 2021). The defaults are the reference code's (n1 = 10^4,
    n2 = 10^6, alpha_1 = alpha_2 = 0.005, Delta = 0.05): 2 n1 + n2 + 1
    forwards per query; the radii are not the reference's 1.0, which abstains
    at sigma 0.25 whatever n_certify (level Phi(4.13) + margin > 1). The
    project's demo (configs/certify/demo.yaml) uses fewer samples: n_center
    1500 and n_certify 4000 (7,001 forwards). n_center must stay above
    ln(4 / alpha) / (2 Delta^2), ~1200 here, or every query abstains; at
    sigma 0.25, n_certify below ~9,400 abstains at radius 0.5
    (``RunConfig.warnings`` names a radius that cannot certify)."""

    sigma: Annotated[float, Field(gt=0, description="std of the Gaussian input noise, in [0, 1] pixel units")] = 0.25
    radii: list[Annotated[float, Field(gt=0)]] = section_field(
        default_factory=lambda: [0.125, 0.25, 0.5],
        description="l2 input radii to certify (pixel units, ||delta||_2 over all C x H x W values)")
    n_center: Annotated[int, Field(ge=1, description=(
        "noisy samples to find the center (the paper's n1; the reference's n_pred); as many fresh ones "
        "again estimate the mass around it"))] = 10_000
    n_certify: Annotated[int, Field(ge=1, description=(
        "fresh noisy samples for the certificate's quantile (the paper's n; the reference's n_cert)"))] = 1_000_000
    alpha: Annotated[float, Field(gt=0, lt=1, description=(
        "failure probability of a query's certificate, split in halves between the center step and the "
        "certificate (the reference: 0.005 + 0.005)"))] = 0.01
    delta: Annotated[float, Field(gt=0, lt=0.5, description=(
        "Delta: the center's ball must hold 1/2 + Delta of the mass (else abstain); it also enters the "
        "certificate's level Phi(Phi^-1(1/2 + Delta) + eps / sigma)"))] = 0.05
    batch_size: Annotated[int, Field(ge=1, description="noisy copies of one query per forward pass")] = 1000
    num_queries: Annotated[int, Field(ge=1, description="queries to certify (the first ones of the query split)")] = 100
    top_k: Annotated[int | None, Field(ge=1, description=(
        "AP@k of the certified retrieval; None: the evaluation's top_k"))] = None
    attack_iters: Annotated[int, Field(ge=1, description=(
        "steps of the l2 PGD on the smoothed code that checks the certificates (attack_check)"))] = 20
    attack_samples: Annotated[int, Field(ge=1, description=(
        "noise draws per query and step of that attack (expectation over the smoothing noise)"))] = 16
    attack_queries: Annotated[int, Field(ge=0, description=(
        "the first this many queries are attacked at every radius where they are certified (`saat-dist "
        "certify`; 0: no attack check)"))] = 20
    query_batch: Annotated[int, Field(ge=1, description=(
        "queries per global batch of `saat-dist certify` (batch b on worker b % W)"))] = 4
    models: Annotated[list[str], Field(description=(
        "`saat-dist certify`: the models to certify ('none': the benign model; the others: defences, trained "
        "from it when missing)"))] = section_field(default_factory=lambda: ["none", "saat"])
    ties: Annotated[Literal["against", "index"], Field(description=(
        "Hamming ties in the certified ranking: against (every tie goes the query's worst way: sound for any "
        "ranker) or index (ties broken by database index, as this project's rankers do)"))] = "against"

    def __post_init__(self) -> None:
        if self.margin_center > self.delta:
            raise ValueError(
                f"certify: n_center={self.n_center} gives Delta_1 = {self.margin_center:.4f} > delta = {self.delta}: "
                f"every query would abstain; use n_center >= {math.ceil(math.log(4 / self.alpha) / (2 * self.delta**2))}")

    @property
    def alpha_center(self) -> float:
        return self.alpha / 2

    @property
    def alpha_certify(self) -> float:
        return self.alpha / 2

    @property
    def margin_center(self) -> float:
        """Delta_1: the two-sided Hoeffding margin of p_hat."""
        return math.sqrt(math.log(2 / self.alpha_center) / (2 * self.n_center))

    @property
    def margin_certify(self) -> float:
        """The one-sided Hoeffding (and DKW) margin of the certificate's quantile."""
        return math.sqrt(math.log(1 / self.alpha_certify) / (2 * self.n_certify))

    def level(self, eps: float) -> float:
        """The quantile level of radius eps: > 1 means abstain at eps."""
        return _PHI.cdf(_PHI.inv_cdf(0.5 + self.delta) + eps / self.sigma) + self.margin_certify

    @property
    def forwards_per_query(self) -> int:
        """center samples + mass check + certificate samples + the base code."""
        return 2 * self.n_center + self.n_certify + 1
