"""Cost at scale (saat_dist.cost_model): FLOP counts against hand counts and
published figures, the time table's arithmetic, the MFU timing, `bench cost`."""

import json

import pytest
import torch
from torch import nn

from saat_dist.cost_model import (
    H200_BF16_DENSE_TFLOPS,
    default_mode_passes,
    measure_step_mfu,
    measured_passes,
    model_flops,
    pass_flops,
    phases_from_config,
    training_cost,
)


def test_pass_flops_match_a_hand_count():
    """Conv 3->4 (3x3, 8x8 px, no bias) then Linear 256->5; a multiply-add is 2 FLOPs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    conv, linear = 2 * 3 * 9 * 4 * 64, 2 * 256 * 5  # per image
    f = pass_flops(model, torch.rand(3, 3, 8, 8))
    assert f["forward"] == conv + linear
    # backward to the input: each layer's input gradient, as many FLOPs as its forward
    assert f["forward_input_backward"] == 2 * (conv + linear)
    # full backward: both weight gradients, the linear's input gradient (the conv's weight
    # gradient needs it), none for the conv's input (the images do not require grad)
    assert f["forward_full_backward"] == (conv + linear) + 2 * linear + conv
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_small_cnn_input_backward_is_cheaper_and_meta_counts_the_same():
    cpu = model_flops("small_cnn", 32, 32)
    assert cpu["forward"] < cpu["forward_input_backward"] < cpu["forward_full_backward"] < 3 * cpu["forward"]
    meta = model_flops("small_cnn", 32, 32, device="meta")
    assert {k: meta[k] for k in ("forward", "forward_input_backward", "forward_full_backward")} == {
        k: cpu[k] for k in ("forward", "forward_input_backward", "forward_full_backward")}


def test_training_cost_arithmetic():
    flops = {"forward": 1e9, "forward_input_backward": 2e9, "forward_full_backward": 3e9}
    t = training_cost(None, flops, images=1000, epochs=20, gpus=2, peak_tflops=100.0, mfu=0.5)
    assert (t["mfu_assumed"], t["peak_tflops_per_gpu"], t["gpus"]) == (0.5, 100.0, 2) and "989" in t["peak_source"]
    m = t["modes"]
    # SAAT: (7 x 2 + 2 x 3) GFLOP per sample and epoch x 1000 x 20 = 4e14 FLOP at 2 x 100 TFLOP/s x 0.5
    assert m["saat"]["flops"] == pytest.approx(4e14) and m["saat"]["hours"] == pytest.approx(4 / 3600)
    assert m["saat"]["hours_per_epoch"] == pytest.approx(4 / 3600 / 20)
    assert m["saat_fgsm"]["ratio_to_saat"] == pytest.approx(8 / 20)
    assert m["saat_free"]["epochs"] == 5 and m["saat_free"]["ratio_to_saat"] == pytest.approx(8 * 3 * 5 / 400)
    # curriculum, the config's default: 3/4 of the stage 1 step and the update at a quarter of the pixels,
    # 1/4 3 steps and the update at full resolution
    c = m["saat_curriculum"]
    assert c["inner_passes"] == pytest.approx(0.75 * 1 * 0.25 + 0.25 * 3)
    assert c["outer_passes"] == pytest.approx(0.75 * 2 * 0.25 + 0.25 * 2)
    assert c["ratio_to_saat"] == pytest.approx((0.9375 * 2 + 0.875 * 3) / 20) and c["epochs"] == 20
    assert m["benign"]["ratio_to_saat"] == pytest.approx(3 / 20)
    assert {v["source"] for v in m.values()} == {"formula"}

    # train.json records (a total per sample of a step, split with the formula's 2 updates), or inner/outer
    measured = {"saat_fgsm": {"passes_per_sample": 3.5, "passes_per_image": 70.0, "epochs": 20},
                "saat": {"inner": 6, "outer": 2}, "saat_free": {"inner": 0, "outer": 8, "epochs": 4}}
    m2 = training_cost(measured, flops, images=1000, epochs=20, gpus=2, peak_tflops=100.0, mfu=0.5)["modes"]
    assert (m2["saat_fgsm"]["inner_passes"], m2["saat_fgsm"]["outer_passes"]) == (1.5, 2.0)
    assert m2["saat"]["flops"] == pytest.approx(18e9 * 1000 * 20) and m2["saat"]["source"] == "measured"
    assert m2["saat_free"]["epochs"] == 4 and m2["saat_curriculum"]["source"] == "formula"
    # a 6-epoch run's records: free training's 1.5 epochs are a quarter of SAAT's, at any schedule
    demo = {"saat": {"passes_per_sample": 9.0, "epochs": 6}, "saat_free": {"passes_per_image": 12.0, "epochs": 1.5}}
    m3 = training_cost(demo, flops, images=1000, epochs=20)["modes"]
    assert m3["saat"]["epochs"] == 20 and m3["saat_free"]["epochs"] == 5 and m3["saat_free"]["outer_passes"] == 8
    assert m3["saat_free"]["ratio_to_saat"] == pytest.approx(8 * 3 * 5 / 400)
    with pytest.raises(ValueError, match="below"):
        training_cost({"saat": {"passes_per_sample": 1}}, flops, 1000, 20)
    with pytest.raises(ValueError, match="unknown mode"):
        training_cost({"new_mode": {"passes_per_sample": 4}}, flops, 1000, 20)
    with pytest.raises(ValueError, match="needs"):
        training_cost({"saat": {"passes_per_image": 180}}, flops, 1000, 20)  # over how many epochs?


def test_the_formula_is_the_defences_config_defaults():
    from saat_dist.defences.saat import SAATConfig
    from saat_dist.defences.saat_curriculum import SAATCurriculumConfig
    from saat_dist.defences.saat_fgsm import SAATFGSMConfig
    from saat_dist.defences.saat_free import SAATFreeConfig

    saat, fgsm, free, cur = SAATConfig(), SAATFGSMConfig(), SAATFreeConfig(), SAATCurriculumConfig()
    p = default_mode_passes()
    assert (p["saat"]["inner"], p["saat"]["outer"]) == (saat.iters, 2) == (7, 2)
    assert (p["saat_fgsm"]["inner"], p["saat_fgsm"]["epoch_factor"]) == (fgsm.iters, fgsm.epochs / saat.epochs)
    assert p["saat_fgsm"]["inner"] == 1 and p["saat_fgsm"]["epoch_factor"] == 1
    assert p["saat_free"]["outer"] == 2 * free.replays == 8
    assert p["saat_free"]["epoch_factor"] == free.epochs / saat.epochs == 0.25
    assert p["saat_curriculum"]["phases"] == phases_from_config(cur.phases) == [
        {"fraction": 0.75, "inner": 1, "resolution": 0.5, "outer_resolution": 0.5},
        {"fraction": 0.25, "inner": 3, "resolution": 1.0, "outer_resolution": 1.0}]
    # the schedule's epochs default to SAAT's
    flops = {"forward": 1.0, "forward_input_backward": 2.0, "forward_full_backward": 3.0}
    assert training_cost(None, flops, images=10)["modes"]["saat_free"]["epochs"] == saat.epochs * 0.25 == 5
    # other replays: their passes, the config's epochs
    assert default_mode_passes(replays=2)["saat_free"] == {"inner": 0.0, "outer": 4.0, "epoch_factor": 0.25}


def test_curriculum_phases_are_an_input():
    p = default_mode_passes([{"fraction": 0.25, "inner": 4, "resolution": 0.5},
                             {"fraction": 0.75, "inner": 8, "resolution": 1.0}], inner_scale=lambda r: r)
    assert p["saat_curriculum"]["inner"] == pytest.approx(0.25 * 4 * 0.5 + 0.75 * 8)
    with pytest.raises(ValueError, match="fractions"):
        default_mode_passes([{"fraction": 0.5, "inner": 2, "resolution": 0.5}])
    # saat_curriculum's config form: the whole step (attack and update) at the phase's scale
    cfg = phases_from_config([{"until": 0.75, "iters": 1, "scale": 0.5}, {"until": 1.0, "iters": 3, "scale": 1.0}])
    c = default_mode_passes(cfg)["saat_curriculum"]
    assert c["inner"] == pytest.approx(0.75 * 0.25 + 0.25 * 3) and c["outer"] == pytest.approx(0.75 * 0.5 + 0.25 * 2)
    assert (c["inner"] + c["outer"]) / 9 == pytest.approx(0.2014, abs=1e-4)  # a fifth of SAAT's passes


def test_measured_passes_read_from_train_json(tmp_path):
    for folder, record in (("saat_fgsm", {"cost": {"passes_per_sample": 3, "passes_per_image": 60, "epochs": 20}}),
                           ("run2", {"cost": {"mode": "saat_curriculum", "passes_per_image": 5.75}}),
                           ("benign", {"history": []})):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.json").write_text(json.dumps(record))
    got = measured_passes(tmp_path)
    assert set(got) == {"saat_fgsm", "saat_curriculum"} and got["saat_curriculum"]["passes_per_image"] == 5.75


def test_measure_step_mfu_on_cpu_is_consistent():
    """On CPU in fp32 the MFU means nothing; the FLOPs and the timing must agree."""
    from saat_dist.models import build_hash_model

    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=8)
    r = measure_step_mfu(model, torch.rand(4, 3, 32, 32), "cpu", torch.float32, steps=2, warmup=1)
    per = r["flops_per_image"]
    assert r["flops_per_step"] == 4 * (7 * per["forward_input_backward"] + 2 * per["forward_full_backward"])
    # a real step, counted: the attack computes no weight gradients, the update no input gradient
    assert r["flops_per_step_counted"] == r["flops_per_step"]
    assert r["seconds"] > 0 and r["achieved_tflops"] * 1e12 == pytest.approx(r["flops_per_step"] * 2 / r["seconds"])
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / H200_BF16_DENSE_TFLOPS)
    assert r["images_per_second"] == pytest.approx(4 * 2 / r["seconds"]) and r["dtype"] == "float32"
    assert torch.isfinite(torch.tensor(r["final_loss"]))


def test_bench_cost_small_writes_the_tables(tmp_path, monkeypatch):
    from saat_dist.cli import main

    runs = tmp_path / "runs" / "saat_fgsm"
    runs.mkdir(parents=True)
    (runs / "train.json").write_text(json.dumps({"cost": {"passes_per_sample": 3.5, "passes_per_image": 21.0,
                                                           "epochs": 6, "seconds": 12.0}}))
    monkeypatch.setenv("SAAT_COST_FROM", str(tmp_path / "runs"))
    assert main(["bench", "cost", "--small", "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert set(r["models"]) == {"small_cnn@32", "alexnet@224", "resnet50@32"}
    alex = r["models"]["alexnet@224"]
    # torchvision AlexNet: 0.714 G multiply-adds published, 2 FLOPs each (the 4096 x 1000 classifier
    # replaced by the 4096 x 64 hash layer)
    assert alex["forward"] == pytest.approx(1.43e9, rel=0.10)
    nus = r["tables"]["nus-wide"]
    assert nus["backbone"] == "alexnet@224" and nus["images"] == 10_500 and nus["mfu_assumed"] == 0.4
    saat = nus["modes"]["saat"]
    assert saat["flops"] == pytest.approx(
        10_500 * 20 * (7 * alex["forward_input_backward"] + 2 * alex["forward_full_backward"]))
    assert saat["hours"] == pytest.approx(saat["flops"] / (8 * 989e12 * 0.4) / 3600) and saat["ratio_to_saat"] == 1
    assert nus["modes"]["saat_fgsm"]["source"] == "measured" and nus["modes"]["saat_fgsm"]["inner_passes"] == 1.5
    # the low-resolution inner steps at AlexNet's counted FLOPs: above the pixel ratio (a fixed-size head)
    assert 0.25 < nus["low_res_flop_ratio"]["0.5"]["inner"] < 0.4
    assert set(nus["modes"]) == {"benign", "saat", "saat_fgsm", "saat_free", "saat_curriculum"}
    ref = r["certify"]["nus-wide"]["settings"]["reference"]  # issue 20: 2,100 queries on one GPU
    assert ref["forwards_per_query"] == 2 * 10_000 + 1_000_000 + 1
    assert ref["hours"] == pytest.approx(2_100 * ref["forwards_per_query"] * alex["forward"] / (989e12 * 0.4) / 3600)
    # the config's curriculum (the whole step at half the side for 3/4 of the stage) at AlexNet's counted
    # low-resolution FLOPs: a little above its pixel-weighted fifth of SAAT's passes
    assert nus["modes"]["saat_curriculum"]["ratio_to_saat"] == pytest.approx(0.233, abs=0.002)
    assert nus["modes"]["saat_free"]["epochs"] == 5 and r["tables"]["imagenet-1k"]["epochs"] == 20


@pytest.mark.slow
def test_resnet50_at_224_matches_the_published_count():
    """ResNet-50: 4.09 G multiply-adds published; AlexNet counted on CPU as on the meta device."""
    r = model_flops("resnet50", 224, 64, device="meta")
    assert r["forward"] == pytest.approx(8.18e9, rel=0.05)
    assert r["forward_input_backward"] == 2 * r["forward"]
    cpu, meta = model_flops("alexnet", 224, 64), model_flops("alexnet", 224, 64, device="meta")
    assert cpu["forward_full_backward"] == meta["forward_full_backward"]
