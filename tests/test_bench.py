"""The benchmark command runs and checks its own answers (speed targets live in its JSON, not here)."""

import json

import pytest

from saat_dist.cli import main

pytestmark = pytest.mark.slow


def test_bench_small_writes_json(tmp_path):
    from saat_dist.bench import SMALL, bench_eval

    for which in ("map", "mainstay", "saat-step", "modes"):  # the soak is a whole run: the pipeline tests have one
        assert main(["bench", which, "--small", "--out", str(tmp_path)]) == 0
    modes = json.loads((tmp_path / "modes.json").read_text())["modes"]
    # passes per sample, counted: tiny's SAAT has 2 inner steps; the curriculum's 75 % at 1 step (at 32 px its
    # half-side phase stays at full resolution: min_side), 25 % at 3 steps
    assert {n: r["passes_per_sample"] for n, r in modes.items()} == pytest.approx(
        {"benign": 1.0, "saat": 4.0, "saat_fgsm": 3.0, "saat_free": 8.0, "saat_curriculum": 0.75 * 3 + 0.25 * 5})
    assert modes["saat"]["seconds_vs_saat"] == 1.0 and all(r["seconds_per_batch"] > 0 for r in modes.values())
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
    # the evaluation case at its smaller size, its `saat-dist evaluate` on one
    # in-process rank (a streaming evaluation on 2 Ray workers: tests/test_pipeline.py)
    ev = bench_eval({**SMALL["eval"], "database": SMALL["eval"]["database"][:1], "workers": 0})
    (row,) = ev["rows"]
    assert row["database"] == 600 and len(row["peak_rss_mib_per_rank"]) == 1 and 0 < row["clean_map"] <= 1

def test_bench_stream_measures_every_path(tmp_path):
    """`bench stream --small`: both kinds of data, from disk and over HTTP,
    with and without the sha256 check, and the parts (bytes alone, decoding alone)."""
    assert main(["bench", "stream", "--small", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "stream.json").read_text())
    paths = {(row["data"], row["from"], row["sha256_check"]) for row in r["rows"]}
    assert paths == {(d, w, v) for d in ("png_32", "jpeg_224") for w in ("disk", "http") for v in (True, False)}
    for row in r["rows"]:
        assert row["images_per_second"] > 0 and row["bytes_alone_samples_per_second"] > 0
    for part in r["by_data"].values():
        # the stream decodes what the bytes carry: never faster than decoding alone
        assert 0 < part["stream_vs_decode_alone"] <= 1.2
    assert r["by_data"]["png_32"]["decode_alone_images_per_second"] > \
        r["by_data"]["jpeg_224"]["decode_alone_images_per_second"]  # a 500 x 375 JPEG costs more than a mosaic
