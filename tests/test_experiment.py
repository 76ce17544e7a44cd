"""`saat-dist experiment`: the grid on the tiny data set, the files it writes,
the worst case, the checks (each made to trigger on a model built to trip
it), resuming cell by cell, the settings digests. (Its stages run on Ray
workers through the same `pipeline.launch` as `saat-dist run`: tests/test_pipeline.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saat_dist.cli import main
from saat_dist.config import load_config
from saat_dist.data.source import DataSource
from saat_dist.attacks import ATTACK_REGISTRY
from saat_dist.evaluation import CHECKS, SINGLE_RUN, EvaluationStage, evaluate, run_checks
from saat_dist.evaluation.leaderboard import read_entry
from saat_dist.evaluation.suite import not_moved

# A few iterations of every attack: the numbers show the machinery works, not who wins.
FAST = ["eval.num_queries=16", "experiment.bits=[16]", "attack.restarts=2", "attack.hag.iters=8",
        "attack.sdha.iters=8", "attack.square.iters=20", "attack.transfer.iters=4", "attack.dhta.iters=8",
        "attack.p2p.iters=8", "attack.tha.pnet_steps=30", "attack.tha.iters=4", "experiment.eps_sweep=[0,0.03,0.0627451]",
        "log_every_s=30", "train.epochs=1", "saat.epochs=1", "cgat.epochs=1", "atrdh.epochs=1", "pgd_at.epochs=1",
        "cgat.batch_size=32", "atrdh.batch_size=32", "pgd_at.batch_size=32", "saat.iters=2", "cgat.iters=2",
        "atrdh.iters=2", "pgd_at.iters=2"]


def args(out, shards, *extra):
    sets = [f"output_dir={out}", f"data.shard_dir={shards}", "data.build_demo=false", *FAST, *extra]
    return ["experiment", "--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def experiment(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    shards = tiny_demo[1]["shard_dir"]
    assert main(args(out, shards, "distributed.num_workers=0")) == 0
    return out, shards


@pytest.mark.slow
def test_experiment_json_has_the_documented_shape(experiment):
    out, _ = experiment
    r = json.loads((out / "experiment.json").read_text())
    assert {"table1", "table2", "checks"} <= set(r)
    attacks = {"mainstay", "hag", "sdha", "square", "bim", "difgsm", "nifgsm", "sinifgsm", "vmifgsm",
               "mainstay_targeted", "dhta", "p2p", "tha"}
    assert {row["attack"] for row in r["table1"]} == attacks | {SINGLE_RUN}
    for row in r["table1"]:
        assert {"hash", "bits", "attack", "kind", "map", "tmap"} <= set(row)
        assert (row["hash"], row["bits"]) == ("dph", 16) and 0 <= row["map"] <= 1
        assert (row["tmap"] is None) == (row["kind"] == "untargeted")
    defences = {"none", "saat", "atrdh", "cgat", "pgd_at"}
    assert {row["defence"] for row in r["table2"]} == defences
    assert {row["attack"] for row in r["table2"]} == attacks | {"none", "worst_case"}
    assert set(r["checks"]) == set(CHECKS) and all(v is None or isinstance(v, bool) for v in r["checks"].values())
    assert {row["target"] for row in r["transfer"]} == {"saat", "atrdh", "cgat", "pgd_at"}
    # one run each, the budgets named: the mainstay attack's first restart (4 steps) against SDHA's 8
    assert "dph-16: mainstay mAP <= sdha mAP (benign model; one run each, 4 vs 8 gradient steps)" in r["orderings"]
    assert not any("worst case <= each" in claim for claim in r["orderings"])  # true by construction: not printed
    for claim, d in r["orderings_detail"].items():  # paired over the same queries
        assert claim in r["orderings"] and {"difference", "standard_error", "clear", "like_for_like"} <= set(d)
        assert d["clear"] == (abs(d["difference"]) > 2 * d["standard_error"])
        assert (d["difference"] <= 0) == r["orderings"][claim]
    single = [row for row in r["table1"] if row["attack"] == SINGLE_RUN]
    assert len(single) == 1 and single[0]["restarts"] == 1
    md = (out / "experiment.md").read_text()
    assert "## Table I" in md and "## Table II" in md and "worst case" in md
    for png in r["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {Path(p).name for p in r["plots"]}
    assert {"map_vs_eps_dph-16.png", "pr_and_precision_at_n_dph-16.png", "retrieval_dph-16_saat.png",
            "loss_curves_dph-16.png"} <= names
    for pdf in r["plots_pdf"]:
        assert (out / pdf).read_bytes()[:5] == b"%PDF-"
    # for a paper: the tables as CSV and LaTeX, one leaderboard entry per model
    assert all((out / t).is_file() for t in r["tables"]) and len(r["tables"]) == 4
    assert len(r["leaderboard"]) == len(defences)
    for path in r["leaderboard"]:
        entry = read_entry(out / path)
        res = json.loads((out / entry["source"]["results"]).read_text())
        assert entry["worst_case_map"] == res["worst_case"]["map"] and entry["clean_map"] == res["clean_map"]
        assert entry["model"]["sha256"] == res["spec"]["model"]


@pytest.mark.slow
def test_every_defence_reports_its_training_cost_beside_its_robustness(experiment):
    out, _ = experiment
    r = json.loads((out / "experiment.json").read_text())
    rows = {row["defence"]: row for row in r["cost"]}
    assert set(rows) == {"saat", "atrdh", "cgat", "pgd_at"}
    # FAST: 2 inner PGD steps + the clean and the adversarial pass of the update, per sample of a step
    assert {d: row["passes_per_sample"] for d, row in rows.items()} == {d: 4.0 for d in rows}
    saat = rows["saat"]
    assert saat["passes_vs_saat"] == 1.0 and saat["worst_case_vs_saat"] == 0.0
    table2 = {(t["defence"], t["attack"]): t["map"] for t in r["table2"]}
    assert all(row["worst_case_map"] == table2[(d, "worst_case")] and row["seconds"] > 0 for d, row in rows.items())
    assert "plots/robustness_vs_cost_dph-16.png" in r["plots"] and (out / "plots/robustness_vs_cost_dph-16.pdf").is_file()
    assert "## Robustness against training cost" in (out / "experiment.md").read_text()


@pytest.mark.slow
def test_worst_case_is_at_most_every_attack_and_per_query(experiment):
    out, _ = experiment
    for folder in ("benign", "saat", "atrdh", "cgat", "pgd_at"):
        res = json.loads((out / "cells" / "dph-16" / folder / "robustness.json").read_text())
        worst = res["worst_case"]["map"]
        assert all(worst <= r["map"] + 1e-12 for r in res["attacks"].values())
        assert sum(res["worst_case"]["lowest_by"].values()) == res["queries"] == 16
        ap = res["per_query_ap"]
        assert len(ap["clean"]) == 16 and set(ap) == {"clean", "worst_case", SINGLE_RUN, *res["attacks"]}
        assert ap["worst_case"] == [min(ap[a][i] for a in res["worst_case"]["attacks"]) for i in range(16)]
        assert sum(ap["mainstay"]) / 16 == pytest.approx(res["attacks"]["mainstay"]["map"], abs=1e-5)
        assert res["eps_sweep"]["map"][0] == res["clean_map"]
        # the sweep runs one restart at every budget: at attack.eps that is the mainstay attack's first restart
        assert res["eps_sweep"]["restarts"] == 1
        assert res["eps_sweep"]["map"][-1] == res["attacks"]["mainstay"]["single_run_map"]
        assert sum(ap[SINGLE_RUN]) / 16 == pytest.approx(res["attacks"]["mainstay"]["single_run_map"], abs=1e-5)
        for r in res["attacks"].values():  # every attack kept its budget
            assert r["perceptibility"]["linf"] <= r["eps"] + 1e-6
        ret = res["retrieval"]
        assert len(ret["clean_top"]) == 4 and len(ret["mainstay_top"][0]) == 10


@pytest.mark.slow
def test_a_rerun_skips_finished_cells_and_redoes_only_stale_evaluations(experiment, caplog):
    out, shards = experiment
    cell = out / "cells" / "dph-16"
    models = {p: p.stat().st_mtime_ns for p in cell.glob("*/model.pt")}
    results = {p: p.read_text() for p in cell.glob("*/robustness.json")}
    with caplog.at_level("INFO", logger="saat_dist"):
        assert main(args(out, shards, "distributed.num_workers=0")) == 0
    assert {p: p.stat().st_mtime_ns for p in cell.glob("*/model.pt")} == models
    assert {p: p.read_text() for p in cell.glob("*/robustness.json")} == results
    assert "saat evaluated with these settings, skipping" in caplog.text
    # another attack setting (and two attacks, to keep it short): evaluations again, models kept
    caplog.clear()
    with caplog.at_level("INFO", logger="saat_dist"):
        assert main(args(out, shards, "distributed.num_workers=0", "attack.hag.iters=9",
                         "experiment.defences=[saat]", "experiment.attacks=[mainstay,hag]")) == 0
    assert {p: p.stat().st_mtime_ns for p in cell.glob("*/model.pt")} == models
    assert "robustness evaluation of saat" in caplog.text
    assert json.loads((cell / "saat" / "robustness.json").read_text())["attacks"]["hag"]["iters"] == 9


@pytest.mark.slow
def test_changed_training_settings_are_refused_naming_the_key(experiment, capsys):
    out, shards = experiment
    assert main(args(out, shards, "distributed.num_workers=0", "saat.lam=2.0")) == 2
    err = capsys.readouterr().err
    assert "saat.lam = 1.0" in err and "another experiment output_dir" in err


class RoundedInput(torch.nn.Module):
    """A hash model behind an input quantiser: zero input gradients everywhere
    (gradient masking), so white-box attacks are blind and random search is not."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, alpha=None):
        return self.model(torch.round(x * 4) / 4, alpha=alpha)


def robust(cfg, model, shards, label):
    """The experiment's evaluation of ``model`` in this process."""
    stage = EvaluationStage(label, tuple(cfg.experiment.attacks), sweep=True)
    return evaluate(cfg, model, DataSource.open(shards), stage)


def masked_config(out, shards, *extra):
    return load_config("configs/tiny.yaml", [f"output_dir={out}", f"data.shard_dir={shards}", *FAST, "model.bits=16",
                                             *extra])


@pytest.mark.slow
def test_checks_trigger_on_a_gradient_masked_model(experiment, trained_small):
    out, shards = experiment
    model, _ = trained_small
    cfg = masked_config(out, shards, "experiment.attacks=[mainstay,hag,bim,square]", "attack.square.iters=60")
    res = robust(cfg, RoundedInput(model), shards, "masked")
    assert res["checks"]["zero_input_gradient"] and "16 of 16" in res["check_details"]["zero_input_gradient"]
    # HAG and BIM start at x and never move; the mainstay attack never leaves its own random start
    assert res["checks"]["zero_perturbation"]
    for name in ("hag", "bim", "mainstay"):
        assert res["attacks"][name]["zero_perturbation"] == 16, name
    assert res["attacks"]["square"]["zero_perturbation"] < 16  # the random search moves without gradients
    # the curve stays near the clean mAP, far above both floors: it stops falling
    assert res["checks"]["map_not_falling_with_eps"], res["eps_sweep"]
    assert res["checks"]["nonfinite_codes"] is False
    # the same model without the quantiser trips none of these
    clean = robust(cfg, model, shards, "plain")
    assert clean["checks"]["zero_input_gradient"] is False and clean["checks"]["zero_perturbation"] is False
    assert clean["checks"]["map_not_falling_with_eps"] is False, clean["eps_sweep"]


class Saturated(torch.nn.Module):
    """A hash model whose tanh saturates: logits pushed at least 0.1 from
    zero (by their sign, whose gradient is zero) and scaled by 1e4, so every
    input gradient is exactly zero while the codes stay the model's. (Scaling
    alone left a logit within 1e-3 of zero unsaturated: at one torch thread a
    query of the small model had one, and the check counted 15 of 16.)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def logits(self, x):
        z = self.model.logits(x)
        return 1e4 * (z + 0.1 * torch.sign(z))

    def forward(self, x, alpha=None):
        return torch.tanh((1.0 if alpha is None else alpha) * self.logits(x).float())


@pytest.mark.slow
def test_a_saturated_output_trips_the_input_gradient_check(experiment, trained_small):
    out, shards = experiment
    model, _ = trained_small
    cfg = masked_config(out, shards, "experiment.attacks=[mainstay]", "experiment.eps_sweep=[0,0.0627451]")
    res = robust(cfg, Saturated(model), shards, "saturated")
    assert res["checks"]["zero_input_gradient"] and "16 of 16" in res["check_details"]["zero_input_gradient"]
    assert res["checks"]["nonfinite_codes"] is False


class InfiniteLogits(torch.nn.Module):
    """Infinite logits on bright images: tanh makes them a clean-looking +-1."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def logits(self, x):
        z = self.model.logits(x)
        return torch.where(x.flatten(1).mean(1, keepdim=True) > 0.05, z * float("inf"), z)

    def forward(self, x, alpha=None):
        return torch.tanh((1.0 if alpha is None else alpha) * self.logits(x).float())


@pytest.mark.slow
def test_infinite_logits_are_caught_before_the_tanh(experiment, trained_small):
    out, shards = experiment
    model, _ = trained_small
    cfg = masked_config(out, shards, "experiment.attacks=[mainstay]", "experiment.eps_sweep=[0]")
    wrapped = InfiniteLogits(model)
    x = torch.rand(4, 3, 32, 32)
    assert torch.isfinite(wrapped(x)).all()  # what a check after the tanh would see
    res = robust(cfg, wrapped, shards, "inf")
    assert res["checks"]["nonfinite_codes"] and "clean" in res["check_details"]["nonfinite_codes"]


class NaNOnBrightImages(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, alpha=None):
        u = self.model(x, alpha=alpha)
        return torch.where(x.flatten(1).mean(1, keepdim=True) > 0.05, u * float("nan"), u)


@pytest.mark.slow
def test_nonfinite_codes_are_caught_not_hidden_by_the_sign(experiment, trained_small):
    out, shards = experiment
    model, _ = trained_small
    cfg = masked_config(out, shards, "experiment.attacks=[mainstay]", "experiment.eps_sweep=[0]")
    res = robust(cfg, NaNOnBrightImages(model), shards, "nan")
    assert res["checks"]["nonfinite_codes"] and "clean" in res["check_details"]["nonfinite_codes"]
    # one budget only: the sweep cannot be judged and says so
    assert res["checks"]["map_not_falling_with_eps"] is None
    assert res["check_details"]["map_not_falling_with_eps"].startswith("not run")


def test_an_attack_that_returns_its_input_or_its_random_start_is_caught():
    x = torch.rand(3, 3, 8, 8)
    start = (x + 0.01).clamp(0, 1)
    moved = (x + 0.02).clamp(0, 1)
    adv = torch.stack([x[0], start[1], moved[2]])
    assert not_moved(adv, [x, start]).tolist() == [True, True, False]


def sweep_result(maps, theory=0.2, rnd=0.3, **attacks):
    return {"attacks": {k: {"map": v} for k, v in attacks.items()},
            "eps_sweep": {"eps": [0.0, 0.01, 0.02, 0.04, 0.08][: len(maps)], "map": maps, "theory_map": theory,
                          "random_map": rnd}}


def test_blackbox_and_eps_checks_by_hand():
    cfg = load_config("configs/tiny.yaml", ["experiment.attacks=[mainstay,hag,square]"])
    runs = [ATTACK_REGISTRY[n] for n in cfg.experiment.attacks]
    finite = {"clean": torch.ones(3, dtype=torch.bool)}
    none = torch.zeros(3, dtype=torch.bool)

    def checks(res, runs=runs):
        return run_checks(cfg, runs, res, finite, {"mainstay": none}, none)

    # the black-box attack below every white-box one; a curve that falls to the floor
    c, d = checks(sweep_result([0.8, 0.5, 0.32, 0.31], mainstay=0.40, hag=0.45, square=0.30))
    assert c["blackbox_beats_whitebox"] and "square" in d["blackbox_beats_whitebox"]
    assert c["map_not_falling_with_eps"] is False  # 0.32 -> 0.31 is flat, but at the random floor (0.3 + 0.05)
    c, _ = checks(sweep_result([0.8, 0.5, 0.32, 0.31], mainstay=0.40, hag=0.45, square=0.41))
    assert c["blackbox_beats_whitebox"] is False
    # a plateau far above both floors, and a rise
    c, d = checks(sweep_result([0.8, 0.6, 0.598, 0.5], mainstay=0.40, hag=0.45, square=0.41))
    assert c["map_not_falling_with_eps"] and "0.6000 -> 0.5980" in d["map_not_falling_with_eps"]
    c, d = checks(sweep_result([0.8, 0.5, 0.6], mainstay=0.40, hag=0.45, square=0.41))
    assert c["map_not_falling_with_eps"] and "0.5000 -> 0.6000" in d["map_not_falling_with_eps"]
    # a robust model's curve: flat at small budgets, falling faster as eps grows (SAAT in the demo) passes;
    # a curve flat from the start to the largest budget does not
    c, _ = checks(sweep_result([0.7752, 0.7703, 0.7655, 0.7493, 0.6797], mainstay=0.40, hag=0.45, square=0.41))
    assert c["map_not_falling_with_eps"] is False
    c, d = checks(sweep_result([0.8, 0.799, 0.797], mainstay=0.40, hag=0.45, square=0.41))
    assert c["map_not_falling_with_eps"] and d["map_not_falling_with_eps"].count("falls by less") == 2
    # without a black-box attack the comparison is not run, and says so: never "passed"
    white = [r for r in runs if r.name != "square"]
    c, d = checks(sweep_result([0.8, 0.5], mainstay=0.40, hag=0.45), runs=white)
    assert c["blackbox_beats_whitebox"] is None and d["blackbox_beats_whitebox"].startswith("not run")


def test_digests_hold_what_can_change_a_number_and_nothing_that_cannot(tiny_demo):
    from saat_dist.experiment import evaluation_settings, training_settings

    shards = tiny_demo[1]["shard_dir"]
    source = DataSource.open(shards)

    def digests(*sets):
        cfg = load_config("configs/tiny.yaml", [f"data.shard_dir={shards}", *sets])
        return training_settings(cfg, source), evaluation_settings(cfg, source)

    base = digests()
    # how fast, where and with how many workers: never a number (sync_batchnorm is on)
    for same in ["distributed.num_workers=4", "data.loader_workers=2", "metrics.port=9000", "log_every_s=3",
                 "distributed.zero_stage=2", "distributed.cpus_per_worker=2", "output_dir=/elsewhere", "name=x",
                 "data.build_demo=false", "distributed.max_failures=5", "distributed.checkpoint_every=7",
                 "data.shard_dir=/moved/copy"]:
        assert digests(same) == base, same
    for key, changes_training, changes_eval in [
        ("seed=1", True, True), ("train.epochs=3", True, False), ("saat.lam=2.0", True, False),
        ("distributed.grad_accum=2", True, False), ("distributed.sync_batchnorm=false", True, False),
        ("distributed.precision=bf16", True, True), ("distributed.bank_sync_every=2", True, False),
        ("data.canonical_slots=6", True, False), ("data.image_size=40", True, True), ("attack.eps=0.1", False, True),
        ("attack.batch_size=3", False, True), ("eval.top_k=50", False, True), ("eval.num_queries=4", False, True),
        ("experiment.defences=[none]", False, False),
    ]:
        t, e = digests(key)
        assert (t != base[0], e != base[1]) == (changes_training, changes_eval), key
    # with per-worker BatchNorm statistics the worker count does change the trained numbers
    assert digests("distributed.sync_batchnorm=false", "distributed.num_workers=4")[0] != \
        digests("distributed.sync_batchnorm=false")[0]


def test_a_setting_added_since_a_cell_was_trained_refuses_it_only_away_from_its_default():
    from saat_dist.experiment import _first_difference

    default = {"saat": {"epochs": 20, "optim": {"lr": 0.05, "schedule": "step"}}, "gaussian": {"sigma": 0.25}}
    old = {"saat": {"epochs": 6, "optim": {"lr": 0.05}}}  # written before `schedule` and the gaussian section
    new = {"saat": {"epochs": 6, "optim": {"lr": 0.05, "schedule": "step"}}, "gaussian": {"sigma": 0.25}}
    assert _first_difference(old, new, "", default) is None
    cyclic = {**new, "saat": {"epochs": 6, "optim": {"lr": 0.05, "schedule": "cyclic"}}}
    assert _first_difference(old, cyclic, "", default) == ("saat.optim.schedule", None, "cyclic")
    assert _first_difference(old, {**new, "saat": {**new["saat"], "epochs": 7}}, "", default) == ("saat.epochs", 6, 7)
    # a setting whose default changed the training (saat_curriculum.min_side: 8 px before it existed, now 32)
    # refuses a cell written before it, unless set to what it was then
    curriculum = {"saat": new["saat"], "saat_curriculum": {"epochs": 6}}
    assert _first_difference(curriculum, {**new, "saat_curriculum": {"epochs": 6, "min_side": 32}}, "", default) \
        == ("saat_curriculum.min_side", 8, 32)
    assert _first_difference(curriculum, {**new, "saat_curriculum": {"epochs": 6, "min_side": 8}}, "", default) is None
    assert _first_difference(old, {**new, "saat_curriculum": {"epochs": 6, "min_side": 32}}, "", default) is None
