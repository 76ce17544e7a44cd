"""Results for a paper, from small in-memory results (no training, no
attack): Tables I/II as CSV and LaTeX saying the markdown's numbers, the
leaderboard entries, the plots (no 0 bar for a missing value, t-mAP on its
own axes, loss curves) and their PDFs, for a run and for an experiment."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from saat_dist.config import load_config
from saat_dist.data.source import DataSource
from saat_dist.evaluation.leaderboard import (ATTACK_KEYS, ENTRY_KEYS, LEADERBOARD_SCHEMA, data_name,
                                              leaderboard_entry, read_entry)
from saat_dist.evaluation.report import (ATTACK_NAMES, NOT_AVAILABLE, _md_table1, _md_table2, experiment_tables,
                                         loss_curve_figure, map_per_stage_figure, write_experiment_report,
                                         write_run_report)
from saat_dist.evaluation.results import RESULTS_FORMAT
from saat_dist.evaluation.suite import SINGLE_RUN
from saat_dist.evaluation.tables import tex_escape, write_tables
from saat_dist.experiment import settings_digests

EPS = 16 / 255
# per attack: kind and per-query APs of 4 queries; the lowest AP per query comes from different attacks
ATTACKS = {"mainstay": ("untargeted", [0.50, 0.20, 0.70, 0.40]), "hag": ("untargeted", [0.30, 0.60, 0.65, 0.45]),
           "mainstay_targeted": ("targeted", [0.55, 0.35, 0.10, 0.50])}


def mean(xs):
    return sum(xs) / len(xs)


def results(shift: float = 0.0, attacks: dict = ATTACKS) -> dict:
    """One model's results in the one results format (only what the reports read)."""
    ap = {name: [round(v + shift, 6) for v in aps] for name, (_, aps) in attacks.items()}
    worst = [min(ap[a][i] for a in ap) for i in range(4)]
    pr = {"points": "levels", "recall": [0.0, 0.5, 1.0], "clean": [0.9, 0.7, 0.5], "mainstay": [0.6, 0.4, 0.3],
          "worst_case": [0.5, 0.3, 0.2]}
    at = {"clean": {"10": 0.8, "50": 0.7}, "mainstay": {"10": 0.5, "50": 0.4}, "worst_case": {"10": 0.4, "50": 0.3}}
    res = {"format": RESULTS_FORMAT, "label": "m", "queries": 4, "top_k": 100, "eps": EPS, "clean_map": 0.8 + shift,
           "random_map": 0.12, "theory_map": 0.05, "theory_tmap": 0.95, "clean_tmap": 0.1, "targeted_queries": 4,
           "attacks": {}, "per_query_ap": {"clean": [0.8 + shift] * 4, **ap, "worst_case": worst},
           "worst_case": {"map": mean(worst), "attacks": list(ap),
                          "lowest_by": {a: sum(ap[a][i] == worst[i] for i in range(4)) for a in ap}},
           "pr_curve": pr, "precision_at": at, "retrieval": {"queries": [], "attack": "mainstay"},
           "checks": {"zero_perturbation": False, "zero_input_gradient": None}, "check_details": {
               "zero_perturbation": "", "zero_input_gradient": "not run: no gradients"},
           "eps_sweep": {"eps": [0.0, EPS], "map": [0.8 + shift, mean(ap["mainstay"])], "attack": "mainstay"},
           "resources": {"seconds": 1.0, "where": []}}
    for name, (kind, _) in attacks.items():
        res["attacks"][name] = {
            "name": name, "kind": kind, "eps": EPS, "iters": 10, "restarts": 3 if name == "mainstay" else 1,
            "whitebox": True, "queries": 4, "map": mean(ap[name]),
            "tmap": 0.6 + shift if kind == "targeted" else None,
            "perceptibility": {"linf": EPS, "l2": 1.0, "mse": 1e-3}, "perceptibility_reference": {"linf": EPS}}
    res["attacks"]["mainstay"]["single_run_map"] = mean(ap["mainstay"]) + 0.01
    return res


@pytest.fixture
def cells():
    """Two cells; the second lacks the SAAT model and the targeted attack: missing values."""
    untargeted = {k: v for k, v in ATTACKS.items() if v[0] == "untargeted"}
    return {("dph", 16): {"none": results(), "saat": results(0.1)},
            ("csq", 32): {"none": results(0.05, untargeted)}}


def md_numbers(line: str) -> list[float]:
    """The 4-decimal numbers of a markdown row after its label (eps is written 16.0/255)."""
    return [float(x) for x in re.findall(r"\d+\.\d{4}", line.split("|", 2)[2])]


def md_rows(lines: list[str]) -> dict[str, str]:
    """label -> the markdown row, for the rows under a table's header."""
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| attack |", "| defence |"))]
    return {ln.split("|")[1].strip(): ln for ln in rows}


def test_csv_tables_parse_back_to_the_markdowns_numbers(cells, tmp_path):
    report = experiment_tables(cells)
    cols = ["dph 16", "csq 32"]
    write_tables(tmp_path, report, cols, ATTACK_NAMES, {"none": "no defence", "saat": "SAAT"})
    # Table I: mAP (and t-mAP) per cell; the markdown's numbers, in order, are the CSV's non-empty ones
    md = md_rows(_md_table1(report, cols))
    table1 = list(csv.DictReader(io.StringIO((tmp_path / "table1.csv").read_text())))
    assert [r["attack_id"] for r in table1] == ["mainstay", SINGLE_RUN, "hag", "mainstay_targeted"]
    for row in table1:
        csv_numbers = [float(row[f"{c} {p}"]) for c in cols for p in ("mAP", "t-mAP") if row[f"{c} {p}"]]
        assert md_numbers(md[row["attack"]]) == csv_numbers, row["attack"]
        assert row["eps (x 1/255)"] == "16.0"
    targeted = table1[-1]
    assert targeted["dph 16 mAP"] == f"{mean(ATTACKS['mainstay_targeted'][1]):.4f}"
    assert targeted["dph 16 t-mAP"] == "0.6000"
    assert targeted["csq 32 mAP"] == targeted["csq 32 t-mAP"] == ""  # not run in that cell: empty, not 0
    assert table1[0]["restarts"] == "3" and "10 x 3 restarts" in md["mainstay (ours)"]
    # Table II: mainstay / worst case (clean) per cell
    md = md_rows(_md_table2(cells, report, cols))
    table2 = list(csv.DictReader(io.StringIO((tmp_path / "table2.csv").read_text())))
    assert [r["defence_id"] for r in table2] == ["none", "saat"]
    for row in table2:
        parts = ("mainstay mAP", "worst-case mAP", "clean mAP")
        csv_numbers = [float(row[f"{c} {p}"]) for c in cols for p in parts if row[f"{c} {p}"]]
        assert md_numbers(md[row["defence"]]) == csv_numbers, row["defence"]
    saat = table2[1]
    worst = cells[("dph", 16)]["saat"]["worst_case"]["map"]
    assert saat["dph 16 worst-case mAP"] == f"{worst:.4f}" and saat["dph 16 clean mAP"] == "0.9000"
    assert saat["csq 32 clean mAP"] == ""  # no SAAT model in that cell


def test_latex_tables_have_booktabs_rows_and_escape_names(cells, tmp_path):
    cells = {("my_loss" if h == "csq" else h, b): by for (h, b), by in cells.items()}  # a name to escape
    report = experiment_tables(cells)
    cols = ["dph 16", "my_loss 32"]
    names = {**ATTACK_NAMES, "hag": "HAG_10% & more"}
    write_tables(tmp_path, report, cols, names, {"none": "no defence", "saat": "SAAT #1"}, name="x")
    t1 = (tmp_path / "table1.tex").read_text()
    assert t1.index(r"\toprule") < t1.index(r"\midrule") < t1.index(r"\bottomrule")
    body = t1[t1.index(r"\midrule"):t1.index(r"\bottomrule")].strip().splitlines()[1:]
    assert len(body) == 4 and all(row.endswith(r" \\") and row.count(" & ") == 5 for row in body)
    assert r"HAG\_10\% \& more" in t1 and r"my\_loss 32" in t1
    targeted = body[-1]
    assert r"\textbf{0.6000}" in targeted and targeted.endswith(r"& -- \\")  # not run in that cell
    assert "10 $\\times$ 3 restarts" in body[0]
    t2 = (tmp_path / "table2.tex").read_text()
    rows = t2[t2.index(r"\midrule"):t2.index(r"\bottomrule")].strip().splitlines()[1:]
    assert len(rows) == 2 and rows[1].startswith(r"SAAT \#1 & ")
    worst = cells[("dph", 16)]["saat"]["worst_case"]["map"]
    assert rf"\textbf{{{worst:.4f}}} (0.9000)" in rows[1]
    # every special character once, an escape never escaped again
    assert tex_escape(r"a_b%c&d$e#f{g}h~i^j\k") == \
        r"a\_b\%c\&d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"


def tiny_source(tmp_path) -> DataSource:
    """A data set's manifest only: the reports read its counts and digest."""
    manifest = {"format": "saat-dist-shards", "version": 1, "num_classes": 3, "label_sets": [[1, 0, 0]],
                "splits": {s: {"count": n, "shards": []} for s, n in (("train", 40), ("test", 4), ("database", 20))}}
    return DataSource(str(tmp_path / "shards"), None, manifest)


def train_json(parts: list[str], steps_per_epoch: int = 3) -> dict:
    log = [{"step": s, **{p: 1.0 / s + i for i, p in enumerate(parts)}} for s in (1, 2, 3, 4, 5, 6)]
    history = [{p: 0.8 + i - e / 10 for i, p in enumerate(parts)} for e in range(2)]
    return {"history": history, "log": log, "schedule": {"steps_per_epoch": steps_per_epoch}, "steps": 6}


def check_entry(path, res: dict) -> dict:
    entry = read_entry(path)
    assert entry["schema"] == LEADERBOARD_SCHEMA and set(ENTRY_KEYS) <= set(entry)
    assert all(set(ATTACK_KEYS) <= set(r) for r in entry["attacks"].values())
    ap = res["per_query_ap"]
    per_query_worst = [min(ap[a][i] for a in res["attacks"]) for i in range(4)]
    assert entry["worst_case_map"] == pytest.approx(mean(per_query_worst))
    lowest = min(res["attacks"], key=lambda a: res["attacks"][a]["map"])
    assert entry["strongest_attack"] == {"attack": lowest, "map": res["attacks"][lowest]["map"]}
    assert entry["worst_case_map"] <= entry["strongest_attack"]["map"]
    assert entry["clean_map"] == res["clean_map"] and entry["threat_model"]["eps_255"] == 16.0
    assert entry["attacks"]["mainstay"]["iters"] == 10 and entry["attacks"]["mainstay"]["restarts"] == 3
    assert entry["tmap"] == {a: r["tmap"] for a, r in res["attacks"].items() if r["kind"] == "targeted"}
    assert re.fullmatch("[0-9a-f]{64}", entry["settings_digest"])
    return entry


def test_a_run_report_has_loss_curves_pdfs_and_leaderboard_entries(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={run}", f"data.shard_dir={tmp_path / 'shards'}"])
    saat_parts = ["loss", "hash", "adv", "bits_flipped"]
    for stage, shift, parts in (("benign", 0.0, ["loss", "hash"]), ("saat", 0.1, saat_parts)):
        (run / stage).mkdir(parents=True)
        res = results(shift)
        (run / stage / "eval.json").write_text(json.dumps(res))
        (run / stage / "train.json").write_text(json.dumps(train_json(parts)))
    report = write_run_report(cfg, run, source=tiny_source(tmp_path))
    assert report["plots"] == ["plots/pr_curves.png", "plots/map_per_stage.png", "plots/loss_curves.png"]
    for png, pdf in zip(report["plots"], report["plots_pdf"]):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / pdf).read_bytes()[:5] == b"%PDF-"
    md = (run / "report.md").read_text()
    assert "](plots/loss_curves.png)" in md and "(plots/map_per_stage.pdf)" in md
    ids = [f"{cfg.train.loss}-{cfg.model.backbone}-{cfg.model.bits}-{d}" for d in ("none", "saat")]
    assert report["leaderboard"] == [f"leaderboard/{i}.json" for i in ids]
    benign = check_entry(run / "leaderboard" / f"{ids[0]}.json", results(0.0))
    saat = check_entry(run / "leaderboard" / f"{ids[1]}.json", results(0.1))
    assert benign["settings_digest"] == saat["settings_digest"]  # one run, one config
    assert saat["model"]["defence"] == "saat" and saat["model"]["bits"] == cfg.model.bits
    assert saat["source"]["kind"] == "run" and saat["source"]["results"] == "saat/eval.json"
    assert saat["settings_digest"] == settings_digests(cfg, tiny_source(tmp_path))["settings_digest"]
    # a changed evaluation setting is another digest; the training settings' stays
    changed = load_config("configs/tiny.yaml", [f"output_dir={run}", f"data.shard_dir={tmp_path / 'shards'}",
                                                "attack.iters=7"])
    other = settings_digests(changed, tiny_source(tmp_path))
    assert other["settings_digest"] != saat["settings_digest"]
    assert other["evaluation_settings_sha256"] != saat["evaluation_settings_sha256"]
    assert other["training_settings_sha256"] == saat["training_settings_sha256"]


def test_an_experiment_writes_tables_entries_and_pdfs_for_every_cell(cells, tmp_path):
    out = tmp_path / "exp"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", f"data.shard_dir={tmp_path / 'shards'}"])
    (out / "cells" / "dph-16" / "saat").mkdir(parents=True)
    (out / "cells" / "dph-16" / "saat" / "train.json").write_text(json.dumps(train_json(["loss", "hash", "adv"])))
    certified = {"sigma": 0.25, "n_center": 1500, "n_certify": 4000, "forwards_per_query": 7001, "alpha": 0.01,
                 "queries": 12, "top_k": 100, "ties": "against", "float_note": "not proven for float32",
                 "attack": {"iters": 10, "samples": 8, "queries": 6}, "smoothed_clean_map": 0.5,
                 "radii": [{"radius_l2": 0.25, "linf_equivalent": 0.0045, "certified_map": 0.125, "level": 0.9,
                            "abstention_rate": 0.25, "mean_hamming_radius": 3.0,
                            "attack_check": {"violations": 0, "attacked": 6, "max_move": 2.0}}]}
    cells = {cell: dict(by) for cell, by in cells.items()}
    cells[("dph", 16)]["saat"] = {**cells[("dph", 16)]["saat"], "certified": certified}  # experiment.certify
    report = write_experiment_report(cfg, cells, tiny_source(tmp_path))
    assert report["certified"] == [{"hash": "dph", "bits": 16, "defence": "saat", "smoothed_clean_map": 0.5,
                                    "radius_l2": 0.25, "linf_equivalent": 0.0045, "certified_map": 0.125,
                                    "abstention_rate": 0.25, "mean_hamming_radius": 3.0, "attack_violations": 0}]
    # trained before costs were recorded: its cost row says n/a instead of vanishing
    (cost,) = report["cost"]
    assert cost["defence"] == "saat" and cost["passes_per_image"] is None and cost["passes_vs_saat"] is None
    assert report["tables"] == ["table1.csv", "table1.tex", "table2.csv", "table2.tex"]
    assert all((out / t).is_file() for t in report["tables"])
    assert len(report["leaderboard"]) == 3  # every model of every cell
    for (h, b), by in cells.items():
        for d, res in by.items():
            check_entry(out / "leaderboard" / f"{h}-{cfg.model.backbone}-{b}-{d}.json", res)
    assert "plots/loss_curves_dph-16.png" in report["plots"] and "plots/loss_curves_csq-32.png" not in report["plots"]
    for pdf in report["plots_pdf"]:
        assert (out / pdf).read_bytes()[:5] == b"%PDF-"
    md = (out / "experiment.md").read_text()
    assert "[table1.tex](table1.tex)" in md and "[loss_curves_dph-16.pdf](plots/loss_curves_dph-16.pdf)" in md
    assert "3 in all): [leaderboard/](leaderboard/)" in md
    assert "## Certified robustness beside Table II (dph 16)" in md
    assert "| SAAT | 0.5000 | 0.25 (1.15/255) | 0.1250 | 25% | 3.00 | 0 / 6 (2) |" in md
    assert "| dph 16 | SAAT | " in md and "| n/a | n/a |" in md  # the cost table's row without costs


def test_the_strongest_attack_is_one_run_on_every_query():
    res = results()
    # the strong check attacks the first queries only: a lower mAP over other queries, not a stronger attack
    res["attacks"]["mainstay_strong"] = {**res["attacks"]["mainstay"], "name": "mainstay_strong", "queries": 2,
                                         "map": 0.01}
    res["worst_case"]["attacks"].append("mainstay_strong")
    entry = leaderboard_entry(res, kind="run", name="r", results_path="saat/eval.json", hash_loss="dph",
                              backbone="small_cnn", bits=16, defence="saat", defence_label="SAAT", model_sha256=None,
                              shard_dir="data/demo/shards", manifest_sha256=None, image_size=32, digests=None,
                              attack_labels=ATTACK_NAMES)
    assert entry["strongest_attack"] == {"attack": "mainstay_targeted", "map": mean(ATTACKS["mainstay_targeted"][1])}
    assert entry["worst_case_map"] <= entry["strongest_attack"]["map"]
    assert entry["data"]["name"] == "demo" and entry["settings_digest"] is None
    assert data_name("/data/nuswide-shards") == "nuswide" and data_name("/data/coco/") == "coco"
    assert entry["attacks"]["mainstay_strong"]["label"] == "mainstay, strong check"


def test_a_bad_leaderboard_entry_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"schema": LEADERBOARD_SCHEMA, **{k: None for k in ENTRY_KEYS[1:] if k != "clean_map"},
                                "attacks": {}}))
    with pytest.raises(ValueError, match=r"e\.json: key 'clean_map' missing"):
        read_entry(path)
    path.write_text(json.dumps({"schema": "other/v9"}))
    with pytest.raises(ValueError, match="schema 'other/v9'"):
        read_entry(path)


def bar_heights(ax) -> list[float]:
    return [round(p.get_height(), 6) for c in ax.containers for p in c]


def test_a_missing_value_is_no_bar_and_t_map_has_its_own_axes():
    import matplotlib.pyplot as plt

    evals = {"benign": {"clean_map": 0.8, "attacked_map": 0.2, "targeted_tmap": 0.7, "clean_tmap": 0.1,
                        "random_map": 0.12},  # no strong attack
             "saat": {"clean_map": 0.75, "attacked_map": 0.6, "attacked_map_strong": 0.5, "clean_tmap": 0.12,
                      "random_map": 0.12}}  # no targeted attack
    fig = map_per_stage_figure(evals)
    map_ax, tmap_ax = fig.axes
    assert bar_heights(map_ax) == [0.8, 0.2, 0.75, 0.6, 0.5]  # 5 bars, none at 0
    assert [t.get_text() for t in map_ax.texts] == [NOT_AVAILABLE]
    assert bar_heights(tmap_ax) == [0.1, 0.7, 0.12]
    assert [t.get_text() for t in tmap_ax.texts] == [NOT_AVAILABLE]
    assert "t-mAP" in tmap_ax.get_ylabel() and "t-mAP" not in map_ax.get_ylabel()
    # the n/a sits where the missing bar would be: the benign group's third slot, the SAAT group's second
    width = 0.8 / 2
    assert map_ax.texts[0].get_position()[0] == pytest.approx(2)
    assert tmap_ax.texts[0].get_position()[0] == pytest.approx(1 + width)
    plt.close(fig)


def test_loss_curves_draw_every_part_per_step_and_per_epoch():
    import matplotlib.pyplot as plt

    benign, saat = train_json(["loss", "hash"]), train_json(["loss", "hash", "adv", "bits_flipped"])
    fig = loss_curve_figure({"benign": benign, "SAAT": saat, "empty": {"log": [], "history": []}})
    assert len(fig.axes) == 3  # benign, SAAT and SAAT's bits-flipped axis; nothing for a training without a log
    b_ax, s_ax, flipped_ax = fig.axes
    lines = {ln.get_label(): ln for ln in s_ax.get_lines() if ln.get_linestyle() == "-"}
    assert set(lines) == {"loss", "hash", "adv"}  # bits flipped is no loss: on its own axis
    assert list(lines["adv"].get_ydata()) == [r["adv"] for r in saat["log"]]
    assert list(lines["adv"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    epoch = [ln for ln in s_ax.get_lines() if ln.get_marker() == "o" and ln.get_color() == lines["adv"].get_color()]
    assert list(epoch[0].get_xdata()) == [3, 6] and list(epoch[0].get_ydata()) == [h["adv"] for h in saat["history"]]
    assert [ln.get_label() for ln in flipped_ax.get_lines() if ln.get_linestyle() == "-"] == ["bits_flipped"]
    assert "bits flipped" in flipped_ax.get_ylabel()
    assert {ln.get_label() for ln in b_ax.get_lines() if ln.get_linestyle() == "-"} == {"loss", "hash"}
    plt.close(fig)
