"""Mainstay codes (DMFL, SAAT.md §3) and the code bank behind them.

The mainstay code of a label vector y is

    b*(y) = sign( sum_i w+_i u_i  -  sum_j w-_j u_j )

with w+ proportional to cos(y, y_i) over items sharing a label with y and w-
uniform over items sharing none. Because cos(y, y_i) only depends on the
*label set* of item i, the bank enters only through per-label-set code sums
(L x K) and counts (L): exact mainstay codes cost O(B * L * (C + K)) per batch,
whatever the number N of training items, and sharing the bank across machines
means summing an L x K table.

Tie rule: a bit whose weighted difference is zero (|v| <= ``TIE_TOL``) is 0,
as ``torch.sign`` gives in the reference code. Such a bit carries no
information and contributes nothing to the attack or SAAT losses.
Edge cases: a side with no items (no relevant, or no irrelevant, items) has
weight 0; an all-zero label vector has no relevant items (every item is
irrelevant to it), and items with an all-zero label are irrelevant to every
query.
"""

from __future__ import annotations

import torch

TIE_TOL = 1e-9


def _sign_with_ties(v: torch.Tensor) -> torch.Tensor:
    out = torch.sign(v)
    out[v.abs() <= TIE_TOL] = 0
    return out


def mainstay_from_table(
    query_labels: torch.Tensor,
    set_labels: torch.Tensor,
    set_sums: torch.Tensor,
    set_counts: torch.Tensor,
) -> torch.Tensor:
    """Mainstay codes from per-label-set tables.

    query_labels B x C (0/1), set_labels L x C (0/1, the distinct label sets),
    set_sums L x K (sum of codes of the items of each set), set_counts L.
    Returns B x K float codes in {-1, 0, +1} on query_labels' device.
    """
    y = query_labels.to(torch.float64)
    g = set_labels.to(device=y.device, dtype=torch.float64)
    sums = set_sums.to(device=y.device, dtype=torch.float64)
    counts = set_counts.to(device=y.device, dtype=torch.float64)

    overlap_BL = y @ g.T
    norms = y.norm(dim=1, keepdim=True) * g.norm(dim=1).unsqueeze(0)
    cos_BL = torch.where(norms > 0, overlap_BL / norms.clamp_min(1e-30), torch.zeros_like(overlap_BL))
    pos_mass = cos_BL @ counts
    pos_BK = (cos_BL @ sums) / pos_mass.clamp_min(1e-30).unsqueeze(1)
    pos_BK[pos_mass <= 0] = 0

    irrelevant_BL = (overlap_BL == 0).to(torch.float64)
    neg_mass = irrelevant_BL @ counts
    neg_BK = (irrelevant_BL @ sums) / neg_mass.clamp_min(1e-30).unsqueeze(1)
    neg_BK[neg_mass <= 0] = 0

    return _sign_with_ties(pos_BK - neg_BK).to(torch.float32)


def label_set_table(
    train_codes: torch.Tensor, train_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(set_labels L x C, set_sums L x K float64, set_counts L) from N items."""
    set_labels, set_id = torch.unique(train_labels.to(torch.int64), dim=0, return_inverse=True)
    sums = torch.zeros(len(set_labels), train_codes.shape[1], dtype=torch.float64, device=train_codes.device)
    sums.index_add_(0, set_id.to(train_codes.device), train_codes.to(torch.float64))
    counts = torch.bincount(set_id, minlength=len(set_labels)).to(torch.float64)
    return set_labels, sums, counts


def mainstay_codes(query_labels: torch.Tensor, train_codes: torch.Tensor, train_labels: torch.Tensor) -> torch.Tensor:
    """Exact mainstay codes b*(y) for each row of ``query_labels``.

    query_labels B x C (0/1), train_codes N x K (codes of the training items,
    usually +-1), train_labels N x C (0/1). Returns B x K in {-1, 0, +1}
    (0 only on exact ties, see the module docstring).
    """
    set_labels, sums, counts = label_set_table(train_codes, train_labels)
    return mainstay_from_table(query_labels, set_labels, sums, counts)


def mainstay_codes_dense(query_labels: torch.Tensor, train_codes: torch.Tensor, train_labels: torch.Tensor,
                         chunk: int = 65536) -> torch.Tensor:
    """The O(B * N * (C + K)) formula over every item, as the reference code
    computes it (in chunks of items to bound memory). The yardstick for tests
    and benchmarks."""
    y = query_labels.to(torch.float64)
    ny = y.norm(dim=1, keepdim=True)
    k = train_codes.shape[1]
    pos = torch.zeros(len(y), k, dtype=torch.float64)
    neg = torch.zeros(len(y), k, dtype=torch.float64)
    pos_mass = torch.zeros(len(y), 1, dtype=torch.float64)
    neg_mass = torch.zeros(len(y), 1, dtype=torch.float64)
    for s in range(0, len(train_codes), chunk):
        Y = train_labels[s : s + chunk].to(torch.float64)
        U = train_codes[s : s + chunk].to(torch.float64)
        overlap = y @ Y.T
        norms = ny * Y.norm(dim=1).unsqueeze(0)
        cos = torch.where(norms > 0, overlap / norms.clamp_min(1e-30), torch.zeros_like(overlap))
        pos += cos @ U
        pos_mass += cos.sum(1, keepdim=True)
        irr = (overlap == 0).to(torch.float64)
        neg += irr @ U
        neg_mass += irr.sum(1, keepdim=True)
    pos = torch.where(pos_mass > 0, pos / pos_mass.clamp_min(1e-30), torch.zeros_like(pos))
    neg = torch.where(neg_mass > 0, neg / neg_mass.clamp_min(1e-30), torch.zeros_like(neg))
    return _sign_with_ties(pos - neg).to(torch.float32)


class CodeBank:
    """The current code of every training item, plus the per-label-set table.

    ``update`` writes new codes for a batch of items (by global index) and
    keeps the L x K table of per-label-set code sums exact, so mainstay codes
    never touch the N x K bank. ``set_labels`` is the data set's list of
    distinct label sets (the shard manifest has it), so that every process
    numbers the sets the same way.

    ``pending`` accumulates the table change since the last ``take_pending``:
    a distributed trainer sums it across processes (an L x K all-reduce whose
    size does not grow with N) and adds the others' part with ``apply_remote``.
    """

    def __init__(self, train_labels: torch.Tensor, bits: int, set_labels: torch.Tensor | None = None) -> None:
        labels = train_labels.to(torch.int64)
        if set_labels is None:
            set_labels = torch.unique(labels, dim=0)
        self.set_labels = set_labels.to(torch.int64)
        self.labels = labels
        self.set_id = _match_rows(labels, self.set_labels)
        self.codes = torch.zeros(len(labels), bits, dtype=torch.float32)
        self.set_sums = torch.zeros(len(self.set_labels), bits, dtype=torch.float64)
        self.set_counts = torch.bincount(self.set_id, minlength=len(self.set_labels)).to(torch.float64)
        self.pending = torch.zeros_like(self.set_sums)

    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Write ``codes`` (B x K) for the items ``index`` (B); last write wins on repeats."""
        index = index.detach().to("cpu", torch.int64)
        codes = codes.detach().to("cpu", torch.float32)
        if len(torch.unique(index)) != len(index):
            keep = {int(i): j for j, i in enumerate(index.tolist())}
            pos = torch.tensor(sorted(keep.values()))
            index, codes = index[pos], codes[pos]
        delta = codes.to(torch.float64) - self.codes[index].to(torch.float64)
        self.set_sums.index_add_(0, self.set_id[index], delta)
        self.pending.index_add_(0, self.set_id[index], delta)
        self.codes[index] = codes

    def write_remote_codes(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Store codes computed elsewhere without touching the table (see ``apply_remote``)."""
        self.codes[index.to("cpu", torch.int64)] = codes.detach().to("cpu", torch.float32)

    def take_pending(self) -> torch.Tensor:
        out, self.pending = self.pending, torch.zeros_like(self.pending)
        return out

    def apply_remote(self, delta: torch.Tensor) -> None:
        """Add table changes made by other processes."""
        self.set_sums += delta.to("cpu", torch.float64)

    def mainstay(self, query_labels: torch.Tensor) -> torch.Tensor:
        return mainstay_from_table(query_labels, self.set_labels, self.set_sums, self.set_counts).to(query_labels.device)

    def recompute_table(self) -> None:
        """Rebuild the sums from the codes (drops float drift of continuous codes)."""
        self.set_sums.zero_()
        self.set_sums.index_add_(0, self.set_id, self.codes.to(torch.float64))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes.clone(), "set_labels": self.set_labels.clone(), "labels": self.labels.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not torch.equal(state["labels"], self.labels) or not torch.equal(state["set_labels"], self.set_labels):
            raise ValueError("code bank checkpoint belongs to another training set (labels differ)")
        self.codes = state["codes"].to(torch.float32).clone()
        self.recompute_table()
        self.pending.zero_()


def _match_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` of each row of ``rows``; every row must be present."""
    key_rows = {tuple(r): i for i, r in enumerate(table.tolist())}
    out = []
    for n, r in enumerate(rows.tolist()):
        i = key_rows.get(tuple(r))
        if i is None:
            raise ValueError(f"item {n}: label set {r} is not in the data set's list of label sets")
        out.append(i)
    return torch.tensor(out, dtype=torch.int64)
