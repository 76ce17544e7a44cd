"""report.json, report.md and PNG plots of a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from saat_dist.checkpoint import write_text_atomic
from saat_dist.config import RunConfig

KEYS = ("clean_map", "attacked_map", "targeted_tmap", "clean_tmap", "theory_map", "theory_tmap")


def _plots(run_dir: Path, evals: dict[str, dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for stage, res in evals.items():
        pr = res["pr_curve"]
        ax.plot(pr["recall"], pr["clean"], "-o", ms=3, label=f"{stage} clean")
        ax.plot(pr["recall"], pr["attacked"], "--o", ms=3, label=f"{stage} attacked")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, clean vs mainstay attack", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    metrics = [("clean_map", "clean mAP"), ("attacked_map", "attacked mAP"), ("attacked_map_strong", "strong attack"),
               ("targeted_tmap", "targeted t-mAP")]
    width = 0.8 / len(evals)
    for i, (stage, res) in enumerate(evals.items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [res.get(k, 0.0) for k, _ in metrics], width, label=stage)
    rnd = next(iter(evals.values()))["random_map"]
    ax.axhline(rnd, color="gray", ls=":", label=f"random codes ({rnd:.2f})")
    ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(metrics))], [m for _, m in metrics])
    ax.set(ylabel="mAP", ylim=(0, 1), title="mAP per stage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "map_per_stage.png", dpi=120)
    plt.close(fig)
    return ["plots/pr_curves.png", "plots/map_per_stage.png"]


def write_report(cfg: RunConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    evals = {}
    for stage in ("benign", "saat"):
        path = run_dir / stage / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run the '{stage}' evaluation before the report")
        evals[stage] = json.loads(path.read_text())
    stages_path = run_dir / "stages.json"
    stage_seconds = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    skipped = {}  # corrupt samples skipped in training (data.skip_corrupt), all ranks
    for stage in ("benign", "saat"):
        train_json = run_dir / stage / "train.json"
        if train_json.is_file():
            skipped[stage] = sum(json.loads(train_json.read_text()).get("skipped_samples_per_rank", []))
    report = {
        "name": cfg.name,
        "random_map": evals["benign"]["random_map"],
        "top_k": cfg.eval.top_k,
        "bits": cfg.model.bits,
        "backbone": cfg.model.backbone,
        "loss": cfg.train.loss,
        "attack": {"eps": cfg.attack.eps, "iters": cfg.attack.iters, "step_size": cfg.attack.step_size,
                   "loss": cfg.attack.loss, "strong_factor": cfg.attack.strong_factor,
                   "strong_restarts": cfg.attack.strong_restarts},
        "saat_eps": cfg.saat.eps,
        **{stage: {k: v for k, v in res.items() if k != "random_map"} for stage, res in evals.items()},
        "stage_seconds": stage_seconds,
        "skipped_samples": skipped,
    }
    report["plots"] = _plots(run_dir, evals)
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(run_dir / "report.md", _markdown(report))
    return report


def _markdown(r: dict) -> str:
    rows = [("clean mAP", "clean_map"), ("mainstay attack mAP", "attacked_map"),
            ("strong attack mAP", "attacked_map_strong"), ("theory bound (untargeted)", "theory_map"),
            ("targeted t-mAP", "targeted_tmap"), ("clean t-mAP (no attack)", "clean_tmap"),
            ("theory bound (targeted)", "theory_tmap")]
    lines = [f"# SAAT run `{r['name']}`", "",
             f"{r['backbone']}, {r['bits']} bits, {r['loss']}; mAP@{r['top_k']}; attack eps = "
             f"{r['attack']['eps'] * 255:.0f}/255, {r['attack']['iters']} iterations, {r['attack']['loss']} loss; "
             f"SAAT eps = {r['saat_eps'] * 255:.0f}/255.", "",
             f"Random codes (floor of meaning): mAP {r['random_map']:.4f}", "",
             "| metric | benign | SAAT |", "|---|---|---|"]
    for label, key in rows:
        b, s = r["benign"].get(key), r["saat"].get(key)
        lines.append(f"| {label} | {'' if b is None else f'{b:.4f}'} | {'' if s is None else f'{s:.4f}'} |")
    p = r["benign"]["perceptibility"]
    lines += ["", f"Perturbation (benign attack): L-inf {p['linf']:.4f}, L2 {p['l2']:.3f}, MSE {p['mse']:.2e}", "",
              "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()), ""]
    if any(r["skipped_samples"].values()):
        lines += ["**Corrupt training samples skipped** (data.skip_corrupt): " + ", ".join(
            f"{k} {v}" for k, v in r["skipped_samples"].items()), ""]
    lines += ["![PR curves](plots/pr_curves.png)", "", "![mAP per stage](plots/map_per_stage.png)", ""]
    return "\n".join(lines)
