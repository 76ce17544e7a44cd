"""The whole protocol through the CLI on the tiny config, and the stages alone."""

import json

import pytest

from saat_dist.cli import main

REPORT_KEYS = {"random_map", "benign", "saat", "stage_seconds", "plots"}
STAGE_KEYS = {"clean_map", "attacked_map", "targeted_tmap", "theory_map", "theory_tmap", "pr_curve",
              "precision_at", "perceptibility"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_address):
    tmp = tmp_path_factory.mktemp("tiny_run")
    args = ["--config", "configs/tiny.yaml", "--set", f"output_dir={tmp / 'run'}",
            "--set", f"data.shard_dir={tmp / 'data' / 'shards'}"]
    assert main(["run", *args]) == 0
    return tmp, args


@pytest.mark.slow
def test_run_writes_a_complete_report(tiny_run):
    tmp, _ = tiny_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    for stage in ("benign", "saat"):
        assert STAGE_KEYS <= set(report[stage])
        for key in ("clean_map", "attacked_map", "targeted_tmap"):
            assert 0 <= report[stage][key] <= 1
        assert report[stage]["perceptibility"]["linf"] <= 16 / 255 + 1e-6
    assert "attacked_map_strong" in report["saat"] and report["saat"]["strong_check"]["queries"] == 8
    assert 0 < report["random_map"] < 1
    assert set(report["stage_seconds"]) >= {"train", "evaluate_benign", "saat", "evaluate_saat", "total"}
    for png in report["plots"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| clean mAP |" in md and "plots/pr_curves.png" in md
    assert (run / "config.yaml").is_file()
    # the demo data set was built on first use, through `data convert`
    assert (tmp / "data" / "list" / "train_img.txt").is_file()
    assert (tmp / "data" / "shards" / "manifest.json").is_file()


@pytest.mark.slow
def test_checkpoints_are_state_dicts(tiny_run):
    import torch

    tmp, _ = tiny_run
    state = torch.load(tmp / "run" / "saat" / "model.pt", weights_only=True)
    assert state["format"] == "saat-dist-model/1" and state["bits"] == 16
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert set(state) == {"format", "backbone", "bits", "model", "steps"}  # a model file holds the model only
    # Ray Train checkpoints: DeepSpeed state + each rank's train state (bank codes are +-1 after SAAT)
    (ckpt,) = sorted(p for p in (tmp / "run" / "ray").glob("*-saat-*/checkpoint_*") if p.is_dir())[-1:]
    for rank in (0, 1):
        train_state = torch.load(ckpt / f"rank-{rank}.pt", weights_only=True)
        assert set(train_state["bank"]["bank"]["codes"].unique().tolist()) <= {-1.0, 1.0}
        assert train_state["step"] == state["steps"]


@pytest.mark.slow
def test_stages_run_alone_from_the_run_directory(tiny_run):
    tmp, args = tiny_run
    run = tmp / "run"
    before = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    assert main(["evaluate", "--which", "benign", *args]) == 0
    assert main(["report", *args]) == 0
    after = json.loads((run / "report.json").read_text())
    # same seed, same model: the evaluation repeats exactly
    assert after["benign"]["clean_map"] == before["benign"]["clean_map"]
    assert after["benign"]["attacked_map"] == before["benign"]["attacked_map"]


def test_report_needs_evaluations(tmp_path, capsys):
    assert main(["report", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}"]) == 2
    assert "run the 'benign' evaluation" in capsys.readouterr().err


@pytest.mark.slow
def test_data_commands(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--train", "24", "--query", "8",
                 "--database", "24", "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 24, "test": 8, "database": 24}
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s"),
                 "--shard-size", "5", "--shard-multiple", "2"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"] == {"count": 24, "shards": 6}
    # a list-format error is a clean exit 2 naming the file and line
    lbl = tmp_path / "d" / "list" / "train_label.txt"
    lines = lbl.read_text().splitlines()
    lines[3] = lines[3] + " 0"
    lbl.write_text("\n".join(lines) + "\n")
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s2")]) == 2
    assert "train_label.txt:4: 11 label values, expected 10" in capsys.readouterr().err


@pytest.mark.slow
def test_single_process_run_without_ray(tmp_path, tiny_demo):
    """distributed.num_workers=0: every stage in this process (debugging path)."""
    run = tmp_path / "run"
    assert main(["run", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={tiny_demo[1]['shard_dir']}", "--set", "distributed.num_workers=0",
                 "--set", "train.epochs=1", "--set", "saat.epochs=1"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report["saat"]["attacked_map"] <= 1
    assert not (run / "ray").exists()
