"""The `saat-dist` command line: --version, the options every sub-command
takes, the log level handed to Ray's processes, the run's summary and the
submit script's explicit command."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from saat_dist import __version__
from saat_dist.cli import build_parser, main, run_summary
from saat_dist.console import LEVEL_ENV, NOISY_LOGGERS, configure_logging

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"saat-dist {__version__}"


@pytest.mark.parametrize("line", [
    ["--debug", "--log-level", "debug", "train", "--config", "configs/tiny.yaml"],
    ["train", "--config", "configs/tiny.yaml", "--debug", "--log-level", "debug"],
    ["--log-level", "warning", "train", "--log-level", "debug", "--debug"],  # the later one wins
    ["data", "convert", "--root", "r", "--out", "o", "--log-level", "debug", "--debug"],
    ["cluster", "status", "--debug", "--log-level", "debug"],
])
def test_debug_and_log_level_anywhere_on_the_line(line):
    args = build_parser().parse_args(line)
    assert args.debug is True and args.log_level == "debug"


def test_defaults_when_absent():
    args = build_parser().parse_args(["report", "--config", "configs/tiny.yaml"])
    assert args.debug is False and args.log_level == "info"


def test_info_lowers_library_chatter_and_debug_shows_it(monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    try:
        assert configure_logging("info") == "info"
        assert os.environ[LEVEL_ENV] == "info"  # Ray's processes get it through job_env
        assert not logging.getLogger("ray.train").isEnabledFor(logging.INFO)
        assert not logging.getLogger("torch.utils.cpp_extension").isEnabledFor(logging.WARNING)
        assert logging.getLogger("saat_dist").isEnabledFor(logging.INFO)
        assert configure_logging("debug") == "debug"
        assert all(logging.getLogger(n).isEnabledFor(logging.DEBUG) for n in NOISY_LOGGERS)
        monkeypatch.setenv(LEVEL_ENV, "warning")
        assert configure_logging() == "warning"  # a worker takes the driver's level
        monkeypatch.setenv(LEVEL_ENV, "loud")
        with pytest.raises(ValueError, match="'loud'.*SAAT_DIST_LOG_LEVEL"):
            configure_logging()
    finally:
        configure_logging("info")
        monkeypatch.delenv(LEVEL_ENV, raising=False)


def test_the_job_environment_carries_the_log_level(monkeypatch):
    from saat_dist.config import load_config
    from saat_dist.distributed.driver import job_env

    monkeypatch.setenv(LEVEL_ENV, "debug")
    assert job_env(load_config("configs/tiny.yaml"))[LEVEL_ENV] == "debug"


@pytest.mark.parametrize("config, watcher", [("configs/tiny.yaml", "0"), ("configs/cluster-cpu.yaml", "1")])
def test_a_preemption_watcher_runs_only_where_notices_are_acted_on(config, watcher, monkeypatch, tmp_path):
    """Ray Train's watcher (whose start logs an "E ... core_worker.cc" line)
    only with distributed.preemption_notices (the cluster configs); preempted
    nodes restart the group either way (max_preemptions, -1 by default)."""
    from saat_dist.config import load_config
    from saat_dist.distributed.driver import build_trainer, job_env
    from saat_dist.stages import SAAT

    monkeypatch.setenv(LEVEL_ENV, "info")
    cfg = load_config(config, ["distributed.address=127.0.0.1:1"])
    assert job_env(cfg)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == watcher
    assert cfg.distributed.max_preemptions == -1
    trainer = build_trainer(cfg, SAAT, tmp_path)  # records its Ray run name there
    assert trainer.run_config.failure_config.max_preemption_failures == -1
    assert trainer.run_config.logging_config.log_level == "WARNING"  # Ray Train's own lines: debug only


def test_run_summary_is_a_table_with_the_budget_and_paths(tmp_path):
    report = {"random_map": 0.1234, "attack": {"eps": 16 / 255, "iters": 100, "strong_factor": 5,
                                                "strong_restarts": 3},
              "benign": {"clean_map": 0.7957, "attacked_map": 0.2395, "targeted_tmap": 0.61},
              "saat": {"clean_map": 0.781, "attacked_map": 0.6901, "attacked_map_strong": 0.6736,
                       "targeted_tmap": 0.2},
              "stage_seconds": {"train": 75.2, "saat": 173.0},
              "plots": ["plots/pr.png", "plots/map.png"]}  # relative to the run directory, as report.json has them
    text = run_summary(report, tmp_path)
    lines = text.splitlines()
    assert lines[0].split() == ["benign", "saat"]
    row = {line[:38].strip(): line[38:].split() for line in lines[1:6]}
    assert row["clean mAP"] == ["0.7957", "0.7810"]
    assert row["mainstay-attack mAP"] == ["0.2395", "0.6901"]
    assert row["strong-attack mAP"] == ["n/a", "0.6736"]  # not a 0: it did not run on the benign model
    assert row["random-code mAP (floor)"] == ["0.1234"]
    assert "eps 16/255, 100 iterations" in text
    assert f"report: {tmp_path / 'report.md'}" in lines and f"numbers: {tmp_path / 'report.json'}" in lines
    assert "time: train 75 s, saat 173 s" in text
    assert f"plots: 2 PNG (+ PDF) in {tmp_path / 'plots'}" in lines
    assert len(lines) <= 15


def test_submit_takes_the_command_explicitly():
    bad = subprocess.run(["bash", "launch/submit.sh", "configs/demo.yaml"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode != 0 and "usage: submit.sh COMMAND CONFIG" in bad.stderr
    bad = subprocess.run(["bash", "launch/submit.sh", "configs/demo.yaml", "run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unknown command 'configs/demo.yaml'" in bad.stderr


def test_a_submitted_job_gets_the_whole_package(tmp_path):
    """The zip `ray job submit` makes from launch/job-runtime-env.yaml (built
    by Ray's own packaging code) holds every source and config file of the
    package and the launch scripts, and nothing of .venv, .git or runs: a
    bare `data` pattern once dropped saat_dist/data/, which a job then took
    from the checkout through the editable install (and on a cluster whose
    image has a plain install, did not find at all)."""
    import zipfile

    import yaml
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((ROOT / "launch" / "job-runtime-env.yaml").read_text())
    assert env["working_dir"] == "."
    # Ray puts its own defaults (.git, .venv, venv, __pycache__) before the user's, as the upload does
    excludes = get_runtime_env_default_excludes() + env["excludes"]
    create_package(str(ROOT), tmp_path / "job.zip", include_gitignore=True, excludes=excludes)
    sent = set(zipfile.ZipFile(tmp_path / "job.zip").namelist())
    wanted = {str(p.relative_to(ROOT)) for top in ("saat_dist", "configs", "launch") for p in (ROOT / top).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert {"saat_dist/data/__init__.py", "saat_dist/distributed/ray_trainer.py"} <= wanted
    assert wanted - sent == set()
    assert not any(n.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in n for n in sent)


@pytest.mark.parametrize("unit,units", [("step", "steps"), ("query", "queries"), ("image", "images"),
                                        ("query-attack", "query-attacks"), ("day", "days")])
def test_progress_lines_say_plurals_right(unit, units, caplog):
    from saat_dist.progress import Progress

    with caplog.at_level(logging.INFO, logger="saat_dist"):
        Progress("encode", 2, unit, every_s=1e9).update(2)
    assert f"encode 2/2 {units} (" in caplog.text
