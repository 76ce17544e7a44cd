"""SyncedBank across two real processes (gloo), against one process holding everything."""

import pytest
import torch
import torch.distributed as dist

from saat_dist.comm.bank_sync import SyncedBank
from saat_dist.mainstay import CodeBank, label_set_table
from tests.gloo import run_on_group


def _labels():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(400, 6, generator=g) < 0.3).float()


def _batches(step, rank):
    """The items and codes rank ``rank`` trains on at ``step``: disjoint halves,
    except at step 3 where both ranks also train items 0-3 (as when the ranks'
    data epochs overlap)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    idx = torch.arange(rank * 200, rank * 200 + 200)[torch.randperm(200, generator=g)[:16]]
    if step == 3:
        idx[:4] = torch.arange(4)
    return idx, torch.randint(0, 2, (16, 12), generator=g).float() * 2 - 1


def _worker(rank, world, sync_every):
    labels = _labels()
    bank = CodeBank(labels, 12)
    synced = SyncedBank(bank, sync_every)
    queries = labels[:30]
    mainstay_per_step, tables = [], []
    for step in range(6):
        synced.update(*_batches(step, rank))
        mainstay_per_step.append(synced.mainstay(queries))
        tables.append(bank.set_sums.clone())
    synced.sync_table()
    return {"mainstay": mainstay_per_step, "tables": tables, "final_table": bank.set_sums.clone(),
            "codes": bank.codes.clone(), "set_labels": bank.set_labels}


def _run(sync_every):
    """Both ranks' results, on a 2-process gloo group (tests/gloo.py)."""
    return dict(enumerate(run_on_group(_worker, 2, sync_every)))


def _single_process():
    """One process applying both ranks' batches at each step (rank 1 last: it wins ties)."""
    labels = _labels()
    bank = CodeBank(labels, 12)
    mainstay, tables = [], []
    for step in range(6):
        for rank in range(2):
            bank.update(*_batches(step, rank))
        mainstay.append(bank.mainstay(labels[:30]))
        tables.append(bank.set_sums.clone())
    return bank, mainstay, tables


@pytest.fixture(scope="module")
def every_step():
    return _run(sync_every=1)


@pytest.mark.slow
def test_sync_every_step_equals_one_process(every_step):
    bank, mainstay, tables = _single_process()
    for rank in (0, 1):
        for step in range(6):
            assert torch.equal(every_step[rank]["mainstay"][step], mainstay[step]), (rank, step)
            assert torch.equal(every_step[rank]["tables"][step], tables[step])
        # every rank's bank codes equal the single process's, the item both
        # ranks trained at step 3 included
        assert torch.equal(every_step[rank]["codes"], bank.codes)


@pytest.mark.slow
def test_table_after_sync_equals_table_from_all_codes():
    res = _run(sync_every=4)
    bank, _, _ = _single_process()
    set_labels, sums, counts = label_set_table(bank.codes, _labels())
    for rank in (0, 1):
        got = res[rank]["final_table"]
        # reorder the reference rows to the bank's label-set order
        ref = torch.stack([sums[(set_labels == row).all(1)][0] if (set_labels == row).all(1).any()
                           else torch.zeros(12, dtype=torch.float64) for row in res[rank]["set_labels"]])
        assert torch.equal(got, ref)
        # between syncs (step 2: no sync yet with every=4) the table lacks the other rank's changes
        assert not torch.equal(res[rank]["tables"][1], res[1 - rank]["tables"][1])
    assert torch.equal(res[0]["final_table"], res[1]["final_table"])
    # the 4th update triggered a sync: mainstay codes then equal one process's
    _, single_mainstay, _ = _single_process()
    for rank in (0, 1):
        assert torch.equal(res[rank]["mainstay"][3], single_mainstay[3])


def test_bytes_per_sync_do_not_depend_on_items():
    """The all-reduced tensor is the L x K table plus the K x K Gram matrix:
    same size for 400 or 40,000 items."""
    for n in (400, 40_000):
        labels = torch.nn.functional.one_hot(torch.arange(n) % 7, 7).float()
        bank = CodeBank(labels, 32)
        assert bank.take_pending().numel() * 8 == (7 * 32 + 32 * 32) * 8


# ---- a bank of own items, on a process group made as the driver asks Ray for it on GPUs


def _own_items_worker(rank, world):
    from saat_dist.comm.collectives import all_gather_ragged, average_buffers
    from saat_dist.hashing import DPHLoss
    from saat_dist.mainstay import label_set_counts

    labels = _labels()
    mine = torch.arange(rank, 400, world)  # a fixed item -> rank assignment
    counts = label_set_counts(labels[mine], torch.unique(labels.long(), dim=0))
    dist.all_reduce(counts)
    bank = CodeBank(labels[mine], 12, torch.unique(labels.long(), dim=0), index=mine, set_counts=counts)
    synced = SyncedBank(bank, 1, share_codes=False)
    g = torch.Generator().manual_seed(7)
    losses = []
    for step in range(4):
        idx = mine[torch.randperm(len(mine), generator=g)[:16]]
        synced.update(idx, torch.randn(16, 12, generator=torch.Generator().manual_seed(step * 10 + rank)).sign())
        u = torch.randn(16, 12, generator=torch.Generator().manual_seed(step)).tanh()
        losses.append(float(DPHLoss().from_stats(u, labels[:16], *synced.dph_stats())[0]))
    gathered = all_gather_ragged(torch.arange(rank + 1, dtype=torch.float32)[:, None])
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank))
    average_buffers(bn)
    return {"losses": losses, "codes": bank.codes.shape, "gathered": gathered.flatten().tolist(),
            "bn_mean": bn.running_mean.tolist(), "backend": str(dist.get_backend())}


@pytest.mark.slow
def test_own_items_bank_on_a_cpu_gloo_group_equals_one_process():
    """Each rank holds half the codes; after each step's sync its DPH loss
    equals the loss one process holding all codes computes."""
    from saat_dist.distributed.driver import GPU_BACKEND
    from saat_dist.hashing import DPHLoss

    # "cpu:gloo,cuda:nccl" as on GPUs; this machine has no CUDA, so the CPU half of it
    out = run_on_group(_own_items_worker, 2, backend=GPU_BACKEND.split(",")[0])
    labels = _labels()
    bank = CodeBank(labels, 12)
    expected = []
    for step in range(4):
        for rank in range(2):
            g = torch.Generator().manual_seed(7)
            mine = torch.arange(rank, 400, 2)
            for _ in range(step + 1):
                idx = mine[torch.randperm(len(mine), generator=g)[:16]]
            bank.update(idx, torch.randn(16, 12, generator=torch.Generator().manual_seed(step * 10 + rank)).sign())
        u = torch.randn(16, 12, generator=torch.Generator().manual_seed(step)).tanh()
        expected.append(float(DPHLoss()(u, labels[:16], bank.codes, labels)[0]))
    for rank in (0, 1):
        assert out[rank]["codes"] == (200, 12)
        assert out[rank]["losses"] == pytest.approx(expected, rel=1e-6)
        assert out[rank]["gathered"] == [0.0, 0.0, 1.0]
        assert out[rank]["bn_mean"] == [0.5, 0.5, 0.5]


@pytest.mark.slow
def test_the_driver_asks_ray_for_a_group_that_carries_cpu_tensors_on_gpus(tmp_path):
    from ray.train.torch import TorchConfig

    from saat_dist.config import load_config
    from saat_dist.distributed.driver import build_trainer
    from saat_dist.stages import TRAIN

    for use_gpu, backend in ((True, "cpu:gloo,cuda:nccl"), (False, "gloo")):
        cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", f"distributed.use_gpu={str(use_gpu).lower()}",
                                                "device=auto"])
        trainer = build_trainer(cfg, TRAIN, tmp_path)
        assert isinstance(trainer.backend_config, TorchConfig)
        assert trainer.backend_config.backend == backend
        assert trainer.scaling_config.use_gpu is use_gpu
