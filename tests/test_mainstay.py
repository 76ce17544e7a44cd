import itertools

import pytest
import torch

from saat_dist.mainstay import CodeBank, mainstay_codes, mainstay_codes_dense, mainstay_from_table


def random_multilabel(n, c, p=0.3, g=None):
    y = (torch.rand(n, c, generator=g) < p).float()
    return y


def objective(b, y, codes, labels):
    """b^T (sum w+ u - sum w- u), straight from the definition, one query."""
    total = torch.zeros(codes.shape[1], dtype=torch.float64)
    overlap = labels.double() @ y.double()
    cos = torch.zeros(len(labels), dtype=torch.float64)
    for i in range(len(labels)):
        denom = labels[i].double().norm() * y.double().norm()
        cos[i] = overlap[i] / denom if denom > 0 and overlap[i] > 0 else 0
    if cos.sum() > 0:
        total += (cos / cos.sum()) @ codes.double()
    irr = (overlap == 0).double()
    if irr.sum() > 0:
        total -= (irr / irr.sum()) @ codes.double()
    return float(b.double() @ total)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_argmax_small_k(seed):
    g = torch.Generator().manual_seed(seed)
    k, c, n = 6, 5, 40
    labels = random_multilabel(n, c, 0.35, g)
    codes = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    queries = random_multilabel(8, c, 0.4, g)
    got = mainstay_codes(queries, codes, labels)
    all_codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=k)))
    for qi in range(len(queries)):
        best = max(objective(b, queries[qi], codes, labels) for b in all_codes)
        assert objective(got[qi], queries[qi], codes, labels) == pytest.approx(best, abs=1e-9)
        # bits that are not ties agree with every maximiser
        maximisers = [b for b in all_codes if objective(b, queries[qi], codes, labels) >= best - 1e-9]
        nz = got[qi] != 0
        for b in maximisers:
            assert torch.equal(b[nz], got[qi][nz])


@pytest.mark.parametrize("single_label", [False, True])
def test_equals_dense_formula(single_label):
    g = torch.Generator().manual_seed(1)
    n, c, k = 3000, 12, 48
    if single_label:
        labels = torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=g), c).float()
        queries = torch.nn.functional.one_hot(torch.randint(0, c, (64,), generator=g), c).float()
    else:
        labels = random_multilabel(n, c, 0.2, g)
        queries = random_multilabel(64, c, 0.2, g)
    codes = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    fast = mainstay_codes(queries, codes, labels)
    dense = mainstay_codes_dense(queries, codes, labels, chunk=700)
    assert torch.equal(fast, dense)
    assert set(fast.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (fast != 0).float().mean() > 0.9


def test_edge_cases():
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]).float()
    codes = torch.tensor([[1, 1, -1, 1], [1, -1, -1, 1], [-1, -1, 1, 1], [1, 1, 1, -1]]).float()
    # no irrelevant items: every item shares a label with [1,1,1] except the all-zero one
    # -> the all-zero item is the only irrelevant one
    q_all = torch.tensor([[1.0, 1, 1]])
    # no relevant items: label 2 appears nowhere
    q_none = torch.tensor([[0.0, 0, 1]])
    # all-zero query label: no relevant items, every item irrelevant
    q_zero = torch.tensor([[0.0, 0, 0]])
    for q in (q_all, q_none, q_zero):
        assert torch.equal(mainstay_codes(q, codes, labels), mainstay_codes_dense(q, codes, labels))
    # no relevant items -> b* = sign(-mean of all irrelevant codes)
    expected = torch.sign(-codes.mean(0, keepdim=True))
    assert torch.equal(mainstay_codes(q_zero, codes, labels), expected)
    # every item relevant (no irrelevant side): only the positive side counts
    only_rel = labels[:3]
    b = mainstay_codes(torch.tensor([[1.0, 1, 0]]), codes[:3], only_rel)
    cos = torch.tensor([1, 1, 1]) / 1.0
    assert torch.equal(b[0], torch.sign(cos @ codes[:3]))
    # exact ties give 0 bits (torch.sign rule): two relevant items with opposite bits
    tie = mainstay_codes(torch.tensor([[1.0, 0, 0]]), codes[:2], labels[:2])
    assert tie[0, 1] == 0 and tie[0, 0] == 1


def test_code_bank_incremental_matches_one_shot():
    g = torch.Generator().manual_seed(2)
    n, c, k = 500, 8, 16
    labels = random_multilabel(n, c, 0.3, g)
    bank = CodeBank(labels, k)
    for _ in range(30):
        idx = torch.randint(0, n, (32,), generator=g)  # repeats inside a batch too
        bank.update(idx, torch.randint(0, 2, (32, k), generator=g).float() * 2 - 1)
    queries = random_multilabel(50, c, 0.3, g)
    assert torch.equal(bank.mainstay(queries), mainstay_codes(queries, bank.codes, labels))
    state = bank.state_dict()
    other = CodeBank(labels, k)
    other.load_state_dict(state)
    assert torch.equal(other.set_sums, bank.set_sums)
    with pytest.raises(ValueError, match="another training set"):
        CodeBank(random_multilabel(n, c, 0.3, g), k).load_state_dict(state)


def test_table_cost_does_not_depend_on_items():
    """The table has one row per label set, whatever N."""
    labels = torch.nn.functional.one_hot(torch.randint(0, 5, (10_000,)), 5).float()
    bank = CodeBank(labels, 8)
    assert bank.set_sums.shape == (5, 8)
    bank.update(torch.arange(10_000), torch.ones(10_000, 8))
    out = mainstay_from_table(torch.eye(5), bank.set_labels, bank.set_sums, bank.set_counts)
    assert out.shape == (5, 8)
