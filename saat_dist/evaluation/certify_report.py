"""The certified-robustness table and plot (``saat-dist certify`` and the
experiment's certified table beside Table II), from certify.json files."""

from __future__ import annotations


def certify_markdown(results: dict[str, dict], title: str = "Certified robustness (center smoothing)") -> list[str]:
    """Per model and l2 radius: certified mAP, abstention rate, mean
    certified Hamming radius, and the attack check."""
    if not results:
        return []
    first = next(iter(results.values()))
    lines = ["", f"## {title}", "",
             f"Center smoothing (Kumar & Goldstein, NeurIPS 2021) of the query code: sigma {first['sigma']:g}, "
             f"{first['n_center']} samples for the center and as many for its check, {first['n_certify']} for the "
             f"certificate ({first['forwards_per_query']} forwards per query), failure probability alpha "
             f"{first['alpha']:g} per query; {first['queries']} queries, mAP@{first['top_k']}, Hamming ties "
             f"{first['ties']} the query. Certified mAP counts an abstention as 0. The l-inf equivalent of an "
             "l2 radius is radius / sqrt(d) (the ball it contains). Attack check: an l2 PGD on the smoothed code "
             f"({first['attack']['iters']} steps x {first['attack']['samples']} noise draws) on the first "
             f"{first['attack']['queries']} queries; violations = smoothed codes moved farther than certified "
             "(must be 0). Floating point: " + first["float_note"] + ".", "",
             "| model | smoothed clean mAP | l2 radius (l-inf equiv.) | certified mAP | abstained | mean Hamming "
             "radius | attack: violations / attacked (max move) |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        for row in r["radii"]:
            a = row["attack_check"]
            mean_r = "n/a" if row["mean_hamming_radius"] is None else f"{row['mean_hamming_radius']:.2f}"
            move = "" if a["max_move"] is None else f" ({a['max_move']:g})"
            lines.append(f"| {label} | {r['smoothed_clean_map']:.4f} | {row['radius_l2']:g} "
                         f"({row['linf_equivalent'] * 255:.2f}/255) | {row['certified_map']:.4f} | "
                         f"{row['abstention_rate']:.0%} | {mean_r} | {a['violations']} / {a['attacked']}{move} |")
    return lines


def certify_figure(results: dict[str, dict], plt):
    """Certified mAP against the l2 radius, one line per model (radius 0: the smoothed codes' clean mAP)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, r in results.items():
        xs = [0.0] + [row["radius_l2"] for row in r["radii"]]
        ys = [r["smoothed_clean_map"]] + [row["certified_map"] for row in r["radii"]]
        ax.plot(xs, ys, "-o", ms=4, label=label)
    ax.set(xlabel="l2 radius (pixel units)", ylabel="certified mAP (lower bound)", ylim=(0, 1.02),
           title="Certified mAP vs radius (center smoothing)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
