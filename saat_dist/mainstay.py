"""Mainstay codes (DMFL, docs/method.md §3) and the code bank behind them.

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
    # torch.where, not a masked assignment: no host sync on a GPU
    return torch.where(v.abs() <= TIE_TOL, torch.zeros_like(v), torch.sign(v))


WEIGHTINGS = ("cosine", "uniform")


def mainstay_from_table(
    query_labels: torch.Tensor,
    set_labels: torch.Tensor,
    set_sums: torch.Tensor,
    set_counts: torch.Tensor,
    weighting: str = "cosine",
) -> torch.Tensor:
    """Mainstay codes from per-label-set tables.

    query_labels B x C (0/1), set_labels L x C (0/1, the distinct label sets),
    set_sums L x K (sum of codes of the items of each set), set_counts L.
    Returns B x K float codes in {-1, 0, +1} on query_labels' device.

    ``weighting``: ``cosine`` (SAAT's w+ proportional to cos(y, y_i); a side
    without items has weight 0, as in SAAT's reference) or ``uniform`` (every
    relevant item alike: CgAT's centre code, the sign of the mean code of
    relevant items minus that of irrelevant ones; the reference computes
    Jaccard weights there but then keeps only whether they are > 0, and when
    either side is empty its formula, sign(n_neg sum_rel - n_pos sum_irr),
    gives the all-zero code, kept here).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"mainstay weighting {weighting!r} is not one of {list(WEIGHTINGS)}")
    y = query_labels.to(torch.float64)
    g = set_labels.to(device=y.device, dtype=torch.float64)
    sums = set_sums.to(device=y.device, dtype=torch.float64)
    counts = set_counts.to(device=y.device, dtype=torch.float64)

    overlap_BL = y @ g.T
    norms = y.norm(dim=1, keepdim=True) * g.norm(dim=1).unsqueeze(0)
    cos_BL = torch.where(norms > 0, overlap_BL / norms.clamp_min(1e-30), torch.zeros_like(overlap_BL))
    if weighting == "uniform":
        cos_BL = (cos_BL > 0).to(torch.float64)
    pos_mass = cos_BL @ counts
    pos_BK = (cos_BL @ sums) / pos_mass.clamp_min(1e-30).unsqueeze(1)
    pos_BK = torch.where((pos_mass > 0).unsqueeze(1), pos_BK, torch.zeros_like(pos_BK))

    irrelevant_BL = (overlap_BL == 0).to(torch.float64)
    neg_mass = irrelevant_BL @ counts
    neg_BK = (irrelevant_BL @ sums) / neg_mass.clamp_min(1e-30).unsqueeze(1)
    neg_BK = torch.where((neg_mass > 0).unsqueeze(1), neg_BK, torch.zeros_like(neg_BK))

    codes = _sign_with_ties(pos_BK - neg_BK)
    if weighting == "uniform":  # CgAT's reference: no centre code when a side is empty
        codes = torch.where(((pos_mass > 0) & (neg_mass > 0)).unsqueeze(1), codes, torch.zeros_like(codes))
    return codes.to(torch.float32)


def label_set_table(
    train_codes: torch.Tensor, train_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(set_labels L x C, set_sums L x K float64, set_counts L) from N items."""
    set_labels, set_id = torch.unique(train_labels.to(torch.int64), dim=0, return_inverse=True)
    sums = torch.zeros(len(set_labels), train_codes.shape[1], dtype=torch.float64, device=train_codes.device)
    sums.index_add_(0, set_id.to(train_codes.device), train_codes.to(torch.float64))
    counts = torch.bincount(set_id, minlength=len(set_labels)).to(torch.float64)
    return set_labels, sums, counts


def label_set_counts(labels: torch.Tensor, set_labels: torch.Tensor) -> torch.Tensor:
    """Items per label set (float64 L) of ``labels`` N x C, sets numbered as ``set_labels``."""
    ids = _match_rows(labels.to("cpu", torch.int64), set_labels.to("cpu", torch.int64))
    return torch.bincount(ids, minlength=len(set_labels)).to(torch.float64)


def mainstay_codes(query_labels: torch.Tensor, train_codes: torch.Tensor, train_labels: torch.Tensor, *,
                   weighting: str = "cosine") -> torch.Tensor:
    """Exact mainstay codes b*(y) for each row of ``query_labels``.

    query_labels B x C (0/1), train_codes N x K (codes of the training items,
    usually +-1), train_labels N x C (0/1). Returns B x K in {-1, 0, +1}
    (0 only on exact ties, see the module docstring).
    """
    set_labels, sums, counts = label_set_table(train_codes, train_labels)
    return mainstay_from_table(query_labels, set_labels, sums, counts, weighting)


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
    """The current codes of training items, the per-label-set table behind
    mainstay codes, and the code Gram matrix behind the DPH loss.

    ``CodeBank(train_labels, bits, set_labels)`` holds every item (global
    index = row). A distributed trainer whose loss needs only the table and
    the Gram matrix (DPH, CSQ) gives each process just the items it trains:
    ``index`` (their global indices) and ``set_counts`` (items per label set
    over the whole training set, so mainstay weights stay global); codes
    then cost N/W x K per process.

    Per-step costs do not depend on the number of items N: ``update`` writes
    B codes and keeps the L x K table of per-label-set code sums and the
    K x K Gram matrix G = sum_j U_j U_j^T exact, so mainstay codes and the
    decomposed DPH loss never touch the N x K codes. ``set_labels`` is the
    data set's list of distinct label sets (the shard manifest has it), so
    that every process numbers the sets the same way.

    ``take_pending`` returns the (table, Gram) change since the last call as
    one flat float64 vector of L*K + K*K values: a distributed trainer sums it
    across processes (an all-reduce whose size does not grow with N) and adds
    the others' part with ``apply_remote``. Everything lives on ``device``
    (the training device), so a step makes no host round trip.
    """

    def __init__(self, train_labels: torch.Tensor, bits: int, set_labels: torch.Tensor | None = None, *,
                 index: torch.Tensor | None = None, set_counts: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        labels = train_labels.to("cpu", torch.int64)
        if set_labels is None:
            set_labels = torch.unique(labels, dim=0)
        self.device = torch.device(device or "cpu")
        self.set_labels = set_labels.to(self.device, torch.int64)
        self._labels_int = labels
        set_id = _match_rows(labels, self.set_labels.cpu())
        if index is None:
            self.index = None  # row = global index
        else:
            index = index.to("cpu", torch.int64)
            if len(index) != len(labels):
                raise ValueError(f"CodeBank: {len(index)} indices for {len(labels)} label rows")
            order = torch.argsort(index)
            index, labels, set_id = index[order], labels[order], set_id[order]
            self._labels_int = labels
            if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
                raise ValueError("CodeBank: repeated item indices")
            self.index = index.to(self.device)
        self.set_id = set_id.to(self.device)
        local_counts = torch.bincount(set_id, minlength=len(self.set_labels)).to(torch.float64)
        counts = local_counts if set_counts is None else set_counts.to("cpu", torch.float64)
        if counts.shape != (len(self.set_labels),):
            raise ValueError(f"CodeBank: set_counts has shape {tuple(counts.shape)}, expected ({len(self.set_labels)},)")
        self.set_counts = counts.to(self.device)
        self.num_items = int(counts.sum())  # N over the whole training set
        self.bits = bits
        self.codes = torch.zeros(len(labels), bits, dtype=torch.float32, device=self.device)
        self._float_labels: torch.Tensor | None = None
        L, K = len(self.set_labels), bits
        # ``stats``: table and Gram matrix in one flat buffer, so a sync is one all-reduce
        self.stats = torch.zeros(L * K + K * K, dtype=torch.float64, device=self.device)
        self.set_sums = self.stats[: L * K].view(L, K)
        self.gram = self.stats[L * K :].view(K, K)
        self._pending = torch.zeros_like(self.stats)

    @property
    def labels(self) -> torch.Tensor:
        """Float multi-hot labels of the held items, on the bank's device (made once)."""
        if self._float_labels is None:
            self._float_labels = self._labels_int.to(self.device, torch.float32)
        return self._float_labels

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of ``codes`` holding the items with global ``index``."""
        index = index.to(self.device, torch.int64)
        if self.index is None:
            return index
        return torch.searchsorted(self.index, index).clamp_max(len(self.index) - 1)

    def check_holds(self, index: torch.Tensor) -> None:
        """Raise if some of ``index`` are not held here (a host sync: for tests and set-up)."""
        if self.index is not None and not bool((self.index[self.rows(index)] == index.to(self.device)).all()):
            raise ValueError("CodeBank: items outside this bank's part of the training set")

    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Write ``codes`` (B x K) for the items ``index`` (B); last write wins on repeats.
        Also updates the table and the Gram matrix (and their pending change)."""
        rows = self.rows(index.detach())
        codes = codes.detach().to(self.device, torch.float32)
        # Repeats without a host sync: sort stably, every entry takes the code of
        # the last write of its item, and only that entry changes the statistics.
        sorted_rows, order = torch.sort(rows, stable=True)
        last = torch.searchsorted(sorted_rows, sorted_rows, right=True) - 1
        new = codes[order][last]
        keep = (last == torch.arange(len(last), device=self.device)).to(torch.float64).unsqueeze(1)
        new64 = new.to(torch.float64) * keep
        old64 = self.codes[sorted_rows].to(torch.float64) * keep
        delta = torch.zeros_like(self.stats)
        L, K = self.set_sums.shape
        delta[: L * K].view(L, K).index_add_(0, self.set_id[sorted_rows], new64 - old64)
        delta[L * K :].view(K, K).add_(new64.T @ new64 - old64.T @ old64)
        self.stats += delta
        self._pending += delta
        self.codes[sorted_rows] = new

    def write_remote_codes(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Store codes computed elsewhere without touching the statistics (see ``apply_remote``)."""
        self.codes[self.rows(index)] = codes.detach().to(self.device, torch.float32)

    def take_pending(self) -> torch.Tensor:
        """The flat (table, Gram) change since the last call; resets it."""
        out, self._pending = self._pending, torch.zeros_like(self._pending)
        return out

    def apply_remote(self, delta: torch.Tensor) -> None:
        """Add (table, Gram) changes made by other processes (flat, as ``take_pending``)."""
        self.stats += delta.to(self.device, torch.float64)

    def mainstay(self, query_labels: torch.Tensor, weighting: str = "cosine") -> torch.Tensor:
        """b*(y) of each row of ``query_labels`` from the current codes (``weighting``: see ``mainstay_from_table``)."""
        return mainstay_from_table(query_labels, self.set_labels, self.set_sums, self.set_counts,
                                   weighting).to(query_labels.device)

    def dph_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(Gram K x K, table L x K, set_labels L x C, N): all the DPH loss needs."""
        return self.gram, self.set_sums, self.set_labels, self.num_items

    def recompute_table(self) -> None:
        """Rebuild table and Gram matrix from the held codes (drops float drift of continuous codes)."""
        c = self.codes.to(torch.float64)
        self.set_sums.zero_()
        self.set_sums.index_add_(0, self.set_id, c)
        self.gram.copy_(c.T @ c)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"codes": self.codes.cpu().clone(), "set_labels": self.set_labels.cpu().clone(),
                 "labels": self._labels_int.clone()}
        if self.index is not None:
            state["index"] = self.index.cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore held codes. The statistics are rebuilt from them: for a bank
        holding part of the items, the caller then sums them across processes
        (``SyncedBank.rebuild``)."""
        same_index = (self.index is None and "index" not in state) or (
            self.index is not None and "index" in state and torch.equal(state["index"], self.index.cpu()))
        if (not torch.equal(state["labels"], self._labels_int)
                or not torch.equal(state["set_labels"], self.set_labels.cpu()) or not same_index):
            raise ValueError("code bank checkpoint belongs to another training set (labels differ)")
        if state["codes"].shape != self.codes.shape:
            raise ValueError(f"code bank checkpoint has codes {tuple(state['codes'].shape)}, "
                             f"expected {tuple(self.codes.shape)}")
        self.codes = state["codes"].to(self.device, torch.float32).clone()
        self.recompute_table()
        self._pending.zero_()


def _match_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index into ``table`` of each row of ``rows``; every row must be present.
    Vectorised (one unique over table + rows), so 1e6 items take a moment."""
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.int64)
    both = torch.cat([table.to(torch.int64), rows.to(torch.int64)])
    uniq, inverse = torch.unique(both, dim=0, return_inverse=True)
    where = torch.full((len(uniq),), -1, dtype=torch.int64)
    where[inverse[: len(table)]] = torch.arange(len(table))  # table rows are distinct
    out = where[inverse[len(table):]]
    missing = (out < 0).nonzero()
    if len(missing):
        n = int(missing[0])
        raise ValueError(f"item {n}: label set {rows[n].tolist()} is not in the data set's list of label sets")
    return out
