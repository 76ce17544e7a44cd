"""Untrusted inputs (manifests, model files and checkpoints from elsewhere)
are checked before use: a clear error naming the file and field, nothing
executed, nothing written."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from saat_dist.checkpoint import CheckpointError, load_state, save_state
from saat_dist.cli import main
from saat_dist.data.shards import MANIFEST, ManifestError, file_url, load_manifest


@pytest.fixture
def hostile(tiny_demo, tmp_path):
    """A copy of the tiny demo's shards whose manifest a test may rewrite."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_demo[1]["shard_dir"], out)
    manifest = json.loads((out / MANIFEST).read_text())

    def write(change):
        m = copy.deepcopy(manifest)
        change(m)
        (out / MANIFEST).write_text(json.dumps(m))
        return out

    return write


def _set(path, value):
    def change(m):
        node = m
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return change


INJECTION = "train-000000.tar; touch {marker}; echo "


@pytest.mark.parametrize("path, value, message", [
    (("splits", "train", "shards", 0, "name"), "../../etc/passwd",
     r"splits.train.shards\[0\].name: '../../etc/passwd' is not a shard name of split 'train'"),
    (("splits", "train", "shards", 0, "name"), "test-000000.tar",
     r"splits.train.shards\[0\].name: 'test-000000.tar' is not a shard name of split 'train'"),
    (("splits", "train", "shards", 1, "name"), "train-000000.tar", r"splits.train.shards\[1\].name: .* listed twice"),
    (("splits", "train", "count"), 241, r"splits.train: shard counts add up to 240, but count says 241"),
    (("splits", "test", "shards", 0, "count"), "20", r"splits.test.shards\[0\].count: expected a count"),
    (("splits", "database", "shards", 0, "count"), -1, r"splits.database.shards\[0\].count: expected a count"),
    (("num_classes", ), 10.5, r"num_classes: expected an integer"),
    (("label_sets", 0), [1, 0], r"label_sets\[0\]: expected 10 values of 0 or 1"),
    (("splits", "train", "shards", 0, "sha256"), "$(reboot)", r"splits.train.shards\[0\].sha256: expected 64 hex"),
    (("version", ), 2, r"format/version: not a saat-dist-shards v1 manifest"),
])
def test_hostile_manifests_fail_naming_the_field(hostile, path, value, message):
    shard_dir = hostile(_set(path, value))
    with pytest.raises(ManifestError, match=message):
        load_manifest(shard_dir)


def test_a_command_in_a_shard_name_runs_nothing(hostile, tmp_path, capsys):
    """The manifest of the issue: a `pipe:` base_url and a shard name carrying
    a command. The run stops with one line naming the field; the command never
    runs and no run directory is written."""
    marker = tmp_path / "pwned"
    shard_dir = hostile(_set(("splits", "train", "shards", 0, "name"), INJECTION.format(marker=marker)))
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={shard_dir}", "--set", "data.build_demo=false",
                 "--set", f"data.base_url=pipe:cat {shard_dir}/{{name}}", "--set", "distributed.num_workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("saat-dist: error: pipe:cat ") and "splits.train.shards[0].name: 'train-000000.tar; touch" in err
    assert "\n" not in err  # one line, no traceback
    assert not marker.exists() and not run.exists()


def flip_one_label_byte(shard) -> None:
    """One byte of the shard changed in place: a label digit of its first
    .json member (the tar stays valid; only the manifest's sha256 knows)."""
    data = bytearray(shard.read_bytes())
    at = data.index(b'"label": [') + len(b'"label": [')
    data[at] = ord("1") if data[at] == ord("0") else ord("0")
    shard.write_bytes(bytes(data))


def test_a_shard_edited_after_conversion_stops_training_naming_it(tiny_demo, tmp_path, capsys):
    """One changed byte in a train shard's .json, the manifest untouched
    (before the check: the stage ran to the end, exit 0): the stage stops in
    one line naming the shard and writes no model."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_demo[1]["shard_dir"], shards)
    flip_one_label_byte(shards / "train-000001.tar")
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={shards}", "--set", "data.build_demo=false",
                 "--set", "distributed.num_workers=0", "--set", "metrics.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("saat-dist: error: shard ") and "train-000001.tar: its sha256 is" in err
    assert not (run / "benign" / "model.pt").exists()


def test_urls_are_built_from_shard_names_only():
    assert file_url("pipe:cat /s/{name}", "train-000001.tar") == "pipe:cat /s/train-000001.tar"
    with pytest.raises(ManifestError, match="refusing to build a URL"):
        file_url("pipe:cat /s/{name}", "x.tar; rm -rf /")


class _Payload:
    """Unpickling this runs a shell command: what a hostile .pt file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_and_checkpoint_files_from_elsewhere(tmp_path, tiny_demo, capsys):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: not a loadable state file"):
        load_state(evil)
    assert not marker.exists()  # weights_only refused the payload
    save_state([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: expected a dict of tensors"):
        load_state(tmp_path / "list.pt")
    # a model file of another kind, where the SAAT stage expects the benign model
    run = tmp_path / "run"
    save_state({"format": "something-else", "model": {}}, run / "benign" / "model.pt")
    code = main(["saat", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={tiny_demo[1]['shard_dir']}", "--set", "data.build_demo=false",
                 "--set", "distributed.num_workers=0", "--set", "metrics.enabled=false"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("benign/model.pt: not a saat-dist-model/1 file")
    torch.save({"format": "saat-dist-model/1", "backbone": "small_cnn", "bits": 16, "model": {"x": torch.ones(1)}},
               run / "benign" / "model.pt")
    assert main(["saat", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={tiny_demo[1]['shard_dir']}", "--set", "data.build_demo=false",
                 "--set", "distributed.num_workers=0", "--set", "metrics.enabled=false"]) == 2
    assert "weights do not fit the configured model" in capsys.readouterr().err


def test_a_ray_failure_names_the_rank_with_the_cause():
    """Of two failing workers, the one with the input error is named, not the
    one that failed because its peer died."""
    from ray.train import WorkerGroupError

    from saat_dist.data.decode import ShardError
    from saat_dist.distributed.driver import describe_failure

    peer = RuntimeError("Connection closed by peer [127.0.0.1]:4242")
    try:
        raise ShardError("shard s/train-000001.tar: sample 00000050: undecodable .png image")
    except ShardError as e:
        cause = RuntimeError("worker raised")
        cause.__cause__ = e
    failed = describe_failure("train", WorkerGroupError("...", {0: peer, 1: cause}))
    assert str(failed) == ("train failed on the Ray workers (rank 1 of 2 failing): ShardError: shard "
                           "s/train-000001.tar: sample 00000050: undecodable .png image")
    assert failed.bad_input
    assert not describe_failure("train", WorkerGroupError("...", {0: peer})).bad_input
