"""The benchmark command runs and checks its own answers (speed targets live in its JSON, not here)."""

import json

import pytest

from saat_dist.cli import main

pytestmark = pytest.mark.slow


def test_bench_small_writes_json(tmp_path, ray_address, monkeypatch):
    from saat_dist.bench import SMALL, bench_eval

    for which in ("map", "mainstay", "saat-step"):  # the soak is a whole run: the pipeline tests have one
        assert main(["bench", which, "--small", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "map.json").read_text())
    assert m["abs_diff"] < 1e-6 and 0 < m["saat_dist"]["map"] < 1  # both methods computed the same mAP
    s = json.loads((tmp_path / "mainstay.json").read_text())
    assert s["identical_codes"] is True and s["sizes"]["items"] == 50_000
    step = json.loads((tmp_path / "saat-step.json").read_text())
    assert [r["items"] for r in step["rows"]] == [2_000, 20_000]
    assert step["max_loss_rel_diff"] <= 1e-6  # the N-independent DPH loss equals the O(N) formula
    for r in step["rows"]:
        # same model, bank and batches: both paths train alike
        assert r["code_bank"]["first_step_losses"] == pytest.approx(r["o_n_formula"]["first_step_losses"], rel=1e-5)
    # the evaluation case at its smaller size only (a Ray Train job per size):
    # its `saat-dist evaluate` joins the module's Ray
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    ev = bench_eval({**SMALL["eval"], "database": SMALL["eval"]["database"][:1]})
    (row,) = ev["rows"]
    assert row["database"] == 600 and len(row["peak_rss_mib_per_rank"]) == 2 and 0 < row["clean_map"] <= 1
