"""Robustness against training cost: every defence's worst-case mAP beside
what its training cost (issue 19).

The cost of a defence is its own stage, from the benign model (every
defence starts there; the benign stage is not counted): forward/backward
passes of the model per training image over the whole stage, in
full-resolution images (``training.trainer.PassCounter``: a forward with
gradients on, followed by its backward to the input or to the weights), and
the training loop's wall time (every attempt of the stage; not the start-up
or the bank fill). Both come from each defence's ``train.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from saat_dist.stages import model_folder


def cost_rows(cells: dict, cells_dir: Path, labels: dict[str, str]) -> list[dict]:
    """One row per (cell, defence) with a train.json: worst-case and clean
    mAP, passes per image, seconds, and both as a share of SAAT's."""
    rows = []
    for (h, b), by in cells.items():
        saat = None
        found = []
        for defence, res in by.items():
            path = cells_dir / f"{h}-{b}" / model_folder(defence) / "train.json"
            train = json.loads(path.read_text()) if path.is_file() else {}
            if defence == "none" or not train:
                continue
            # trained before costs were recorded: the row says n/a rather than vanish
            cost = train.get("cost") or dict.fromkeys(("passes_per_image", "passes_per_sample", "epochs", "seconds"))
            probed = [h for h in train.get("history", []) if "overfit" in h]
            row = {"hash": h, "bits": b, "defence": defence, "label": labels.get(defence, defence),
                   "worst_case_map": res.get("worst_case", {}).get("map"), "clean_map": res["clean_map"],
                   "passes_per_image": cost["passes_per_image"], "passes_per_sample": cost["passes_per_sample"],
                   "epochs": cost["epochs"], "seconds": cost["seconds"],
                   # the catastrophic-overfitting guard (fast modes): epochs (1-based) where it saw a collapse
                   "guard": None if not probed else [e + 1 for e, h in enumerate(probed) if h["overfit"]]}
            found.append(row)
            if defence == "saat":
                saat = row
        for row in found:
            have = saat is not None and None not in (row["passes_per_image"], saat["passes_per_image"])
            row["passes_vs_saat"] = row["passes_per_image"] / saat["passes_per_image"] if have else None
            row["seconds_vs_saat"] = row["seconds"] / saat["seconds"] if have and saat["seconds"] else None
            row["worst_case_vs_saat"] = (row["worst_case_map"] - saat["worst_case_map"]
                                         if saat and None not in (row["worst_case_map"], saat["worst_case_map"])
                                         else None)
        rows += found
    return rows


def cost_markdown(rows: list[dict]) -> list[str]:
    """experiment.md's section: the table, one row per defence and cell."""
    if not rows:
        return []

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["", "## Robustness against training cost", "",
             "Each defence's own stage, from the benign model: forward/backward passes of the model per training "
             "image over the whole stage (full-resolution images; an inner attack's pass goes back to the input, "
             "an update's to the weights) and the training loop's wall time; shares of SAAT's in brackets, and "
             "the worst case's difference from SAAT's.", "",
             "| cell | defence | worst case | vs SAAT | clean | epochs | passes / image | (x SAAT) | passes / sample "
             "| seconds | (x SAAT) | overfitting guard |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['hash']} {r['bits']} | {r['label']} | {f(r['worst_case_map'], '.4f')} | "
                     f"{f(r['worst_case_vs_saat'], '+.4f')} | {r['clean_map']:.4f} | {f(r['epochs'], 'g')} | "
                     f"{f(r['passes_per_image'], '.1f')} | {f(r['passes_vs_saat'], '.2f')} | "
                     f"{f(r['passes_per_sample'], '.2f')} | {f(r['seconds'], '.0f')} | {f(r['seconds_vs_saat'], '.2f')} | "
                     f"{_guard(r['guard'])} |")
    return lines


def _guard(fired: list[int] | None) -> str:
    if fired is None:
        return "not run"
    return f"fired at epoch {', '.join(map(str, fired))}" if fired else "quiet"


def cost_figure(rows: list[dict], tag: str, plt, random_map: float | None = None):
    """Worst-case mAP against passes per image and against seconds (one cell)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, xlabel in ((axes[0], "passes_per_image", "forward/backward passes per training image"),
                            (axes[1], "seconds", "training wall time (s)")):
        for i, r in enumerate(rows):
            if r["worst_case_map"] is None or r[key] is None:
                continue
            ax.plot(r[key], r["worst_case_map"], "o", color=f"C{i}", ms=7, label=r["label"])
            ax.annotate(r["label"], (r[key], r["worst_case_map"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7)
        if random_map is not None:
            ax.axhline(random_map, color="gray", ls=":", label="random codes")
        ax.set(xlabel=xlabel, ylabel="worst-case mAP", xlim=(0, None), title=f"Robustness vs training cost ({tag})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig
