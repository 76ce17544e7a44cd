"""Robustness evaluation of one hash model (SAAT.md §6).

Clean mAP; mAP under the untargeted mainstay attack (and, optionally, under a
strong version with more iterations and random restarts, to rule out masked
gradients); t-mAP under the targeted attack; the theory bounds; PR curves,
precision@N and the perturbation's perceptibility.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from saat_dist.attacks import choose_targets, perceptibility, pgd_attack
from saat_dist.config import RunConfig
from saat_dist.data.stream import load_split
from saat_dist.mainstay import mainstay_codes
from saat_dist.metrics import mean_average_precision, precision_at_n, precision_recall_curve
from saat_dist.progress import Progress
from saat_dist.training.encode import encode

log = logging.getLogger("saat_dist")


class EvalData:
    """The query, database and train splits in memory (uint8 images)."""

    def __init__(self, cfg: RunConfig) -> None:
        d = cfg.data
        q_img, q_lab, _ = load_split(d.shard_dir, "test", d.image_size, d.base_url)
        n = cfg.eval.num_queries or len(q_img)
        self.q_img, self.q_lab = q_img[:n], q_lab[:n]
        self.db_img, self.db_lab, _ = load_split(d.shard_dir, "database", d.image_size, d.base_url)
        self.tr_img, self.tr_lab, _ = load_split(d.shard_dir, "train", d.image_size, d.base_url)


def random_map(data: EvalData, bits: int, top_k: int, seed: int) -> float:
    """mAP of random +-1 codes: the floor below which numbers carry no meaning."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (len(data.q_lab), bits), generator=g).float() * 2 - 1
    db = torch.randint(0, 2, (len(data.db_lab), bits), generator=g).float() * 2 - 1
    return mean_average_precision(q, db, data.q_lab, data.db_lab, top_k)


def local_rows(fn, *tensors):
    """The single-process row map: ``fn`` over all rows (see ``evaluate_model``)."""
    return fn(*tensors)


def _attack_all(model, images_u8, guides, device, cfg: RunConfig, what: str, *, targeted: bool,
                iters: int, restarts: int, seed: int, row_map=local_rows) -> torch.Tensor:
    return row_map(lambda x, g: _attack_rows(model, x, g, device, cfg, what, targeted=targeted, iters=iters,
                                             restarts=restarts, seed=seed), images_u8, guides)


def _attack_rows(model, images_u8, guides, device, cfg: RunConfig, what: str, *, targeted: bool,
                 iters: int, restarts: int, seed: int) -> torch.Tensor:
    a = cfg.attack
    gen = torch.Generator(device=device).manual_seed(seed)
    progress = Progress(what, len(images_u8), unit="image", every_s=cfg.log_every_s)
    out = []
    for s in range(0, len(images_u8), a.batch_size):
        x = images_u8[s : s + a.batch_size].to(device).float().div_(255)
        x_adv = pgd_attack(model, x, guides[s : s + a.batch_size].to(device), eps=a.eps, step_size=a.step_size,
                           iters=iters, targeted=targeted, loss=a.loss, restarts=restarts, generator=gen)
        out.append(x_adv.cpu())
        progress.update(len(x))
    return torch.cat(out)


def evaluate_model(cfg: RunConfig, model: nn.Module, data: EvalData, device, stage: str,
                   strong: bool = False, row_map=local_rows) -> dict:
    """Every number of one model's evaluation.

    ``row_map(fn, *tensors)`` applies ``fn`` to rows of the tensors and returns
    the results for all rows in order; a distributed caller passes one that
    gives each process a slice and gathers the results (encoding and attacks
    are the costly, row-independent parts).
    """
    e, a = cfg.eval, cfg.attack

    def codes_of(images):
        return row_map(lambda x: encode(model, x, device, e.batch_size), images)

    db_codes, q_codes, tr_codes = codes_of(data.db_img), codes_of(data.q_img), codes_of(data.tr_img)
    guide = mainstay_codes(data.q_lab, tr_codes, data.tr_lab)

    res: dict = {"clean_map": mean_average_precision(q_codes, db_codes, data.q_lab, data.db_lab, e.top_k)}
    log.info("%s: clean mAP@%d = %.4f", stage, e.top_k, res["clean_map"])

    x_adv = _attack_all(model, data.q_img, guide, device, cfg, f"{stage} attack", targeted=False,
                        iters=a.iters, restarts=1, seed=cfg.seed + 10, row_map=row_map)
    adv_codes = codes_of(x_adv)
    res["attacked_map"] = mean_average_precision(adv_codes, db_codes, data.q_lab, data.db_lab, e.top_k)
    res["perceptibility"] = perceptibility(data.q_img.float() / 255, x_adv)
    res["theory_map"] = mean_average_precision(-guide, db_codes, data.q_lab, data.db_lab, e.top_k)
    log.info("%s: attacked mAP = %.4f (theory bound %.4f)", stage, res["attacked_map"], res["theory_map"])

    db_sets = torch.unique(data.db_lab, dim=0)
    targets, valid = choose_targets(data.q_lab, db_sets, torch.Generator().manual_seed(cfg.seed + 11))
    t_guide = mainstay_codes(targets[valid], tr_codes, data.tr_lab)
    x_t = _attack_all(model, data.q_img[valid], t_guide, device, cfg, f"{stage} targeted attack",
                      targeted=True, iters=a.iters, restarts=1, seed=cfg.seed + 12, row_map=row_map)
    t_codes = codes_of(x_t)
    res["targeted_tmap"] = mean_average_precision(t_codes, db_codes, targets[valid], data.db_lab, e.top_k)
    res["clean_tmap"] = mean_average_precision(q_codes[valid], db_codes, targets[valid], data.db_lab, e.top_k)
    res["theory_tmap"] = mean_average_precision(t_guide, db_codes, targets[valid], data.db_lab, e.top_k)
    res["targeted_queries"] = int(valid.sum())
    log.info("%s: targeted t-mAP = %.4f (clean %.4f, theory %.4f)", stage, res["targeted_tmap"],
             res["clean_tmap"], res["theory_tmap"])

    if strong:
        # The strong check costs strong_factor x strong_restarts times the plain
        # attack, so it runs on the first strong_queries queries; the plain
        # attack's mAP on the same queries is reported beside it.
        n = a.strong_queries or len(data.q_img)
        x_s = _attack_all(model, data.q_img[:n], guide[:n], device, cfg, f"{stage} strong attack", targeted=False,
                          iters=a.iters * a.strong_factor, restarts=a.strong_restarts, seed=cfg.seed + 13,
                          row_map=row_map)
        s_codes = codes_of(x_s)
        res["attacked_map_strong"] = mean_average_precision(s_codes, db_codes, data.q_lab[:n], data.db_lab, e.top_k)
        res["strong_check"] = {
            "queries": n, "iters": a.iters * a.strong_factor, "restarts": a.strong_restarts,
            "attacked_map_same_queries": mean_average_precision(adv_codes[:n], db_codes, data.q_lab[:n],
                                                                data.db_lab, e.top_k),
        }
        log.info("%s: strong attack (%d iters, %d restarts, %d queries) mAP = %.4f (plain attack on them: %.4f)",
                 stage, a.iters * a.strong_factor, a.strong_restarts, n, res["attacked_map_strong"],
                 res["strong_check"]["attacked_map_same_queries"])

    recall, prec_clean = precision_recall_curve(q_codes, db_codes, data.q_lab, data.db_lab, e.pr_levels)
    _, prec_adv = precision_recall_curve(adv_codes, db_codes, data.q_lab, data.db_lab, e.pr_levels)
    res["pr_curve"] = {"recall": recall.tolist(), "clean": prec_clean.tolist(), "attacked": prec_adv.tolist()}
    res["precision_at"] = {
        "clean": {str(k): v for k, v in precision_at_n(q_codes, db_codes, data.q_lab, data.db_lab, e.precision_at).items()},
        "attacked": {str(k): v for k, v in precision_at_n(adv_codes, db_codes, data.q_lab, data.db_lab, e.precision_at).items()},
    }
    return res
