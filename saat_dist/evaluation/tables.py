"""Tables I and II of ``saat-dist experiment`` as rows of numbers, rendered
three ways from the same rows so they cannot disagree: markdown (in
``experiment.md``), CSV and LaTeX (``table1.csv``, ``table1.tex``,
``table2.csv``, ``table2.tex`` beside it).

Table I: every attack on the benign model, one column per grid cell
("dph 16"): mAP, and for a targeted attack mAP / **t-mAP**.
Table II: every defence, per cell: mAP under the mainstay attack / under the
worst case over every attack (bold), clean mAP in brackets.

CSV: one row per attack (defence), the numbers of each cell in columns of
their own (``dph 16 mAP``, ``dph 16 t-mAP``; ``dph 16 mainstay mAP``,
``dph 16 worst-case mAP``, ``dph 16 clean mAP``) with 4 decimals, as the
markdown; a missing number is an empty field. LaTeX: a ``tabular`` with
booktabs rules (``\\usepackage{booktabs}``), cells laid out as the markdown,
a missing number as ``--``, every name escaped; ``\\input`` it inside your
own ``table`` with its caption.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from saat_dist.checkpoint import write_text_atomic

TABLE_FILES = ("table1.csv", "table1.tex", "table2.csv", "table2.tex")
MISSING_TEX = "--"


def fmt(v: float | None) -> str:
    """A number as every table writes it: 4 decimals, empty when missing."""
    return "" if v is None else f"{v:.4f}"


def iterations_text(iters: int, restarts: int) -> str:
    return f"{iters}" + (f" x {restarts} restarts" if restarts > 1 else "")


# ---------------------------------------------------------------- rows
def table1_rows(report: dict, cols: list[str], names: dict[str, str]) -> list[dict]:
    """Table I from experiment.json's ``table1``: per attack (in the order
    first seen) its id, label, kind, budget and per cell ``(map, tmap)``
    (None: the cell has no such row)."""
    by_attack: dict[str, dict] = {}
    for row in report["table1"]:
        by_attack.setdefault(row["attack"], {})[f"{row['hash']} {row['bits']}"] = row
    rows = []
    for name, per_cell in by_attack.items():
        any_row = next(iter(per_cell.values()))
        rows.append({"attack": name, "label": names.get(name, name), "kind": any_row["kind"], "eps": any_row["eps"],
                     "iters": any_row["iters"], "restarts": any_row["restarts"],
                     "values": {c: None if c not in per_cell else (per_cell[c]["map"], per_cell[c]["tmap"])
                                for c in cols}})
    return rows


def table2_rows(report: dict, cols: list[str], names: dict[str, str]) -> list[dict]:
    """Table II from experiment.json's ``table2``: per defence its id, label
    and per cell ``{"mainstay", "worst_case", "clean"}`` mAPs (None: the cell
    has no such model; a missing number inside is None)."""
    found: dict[str, dict[str, dict]] = {}
    for row in report["table2"]:
        per_cell = found.setdefault(row["defence"], {})
        per_cell.setdefault(f"{row['hash']} {row['bits']}", {})[row["attack"]] = row["map"]
    rows = []
    for defence, per_cell in found.items():
        values = {}
        for c in cols:
            maps = per_cell.get(c)
            values[c] = None if maps is None else {
                "mainstay": maps.get("mainstay"), "worst_case": maps.get("worst_case"), "clean": maps.get("none")}
        rows.append({"defence": defence, "label": names.get(defence, defence), "values": values})
    return rows


# ---------------------------------------------------------------- markdown
def table1_markdown(rows: list[dict], cols: list[str]) -> list[str]:
    lines = ["| attack | kind | eps | iterations | " + " | ".join(cols) + " |", "|---" * (4 + len(cols)) + "|"]
    for r in rows:
        vals = [_table1_cell(r["values"][c], bold=lambda s: f"**{s}**", missing="") for c in cols]
        lines.append(f"| {r['label']} | {r['kind']} | {r['eps'] * 255:.1f}/255 | "
                     f"{iterations_text(r['iters'], r['restarts'])} | " + " | ".join(vals) + " |")
    return lines


def table2_markdown(rows: list[dict], cols: list[str]) -> list[str]:
    lines = ["| defence | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for r in rows:
        vals = [_table2_cell(r["values"][c], bold=lambda s: f"**{s}**", missing="") for c in cols]
        lines.append(f"| {r['label']} | " + " | ".join(vals) + " |")
    return lines


def _table1_cell(v: tuple | None, bold, missing: str) -> str:
    if v is None:
        return missing
    m, t = v
    return f"{fmt(m) or missing} / {bold(fmt(t))}" if t is not None else (fmt(m) or missing)


def _table2_cell(v: dict | None, bold, missing: str) -> str:
    if v is None:
        return missing
    clean = fmt(v["clean"]) or missing
    return f"{fmt(v['mainstay']) or missing} / {bold(fmt(v['worst_case']) or missing)} ({clean})"


# ---------------------------------------------------------------- CSV
def table1_csv(rows: list[dict], cols: list[str]) -> str:
    head = ["attack_id", "attack", "kind", "eps (x 1/255)", "iterations", "restarts"]
    head += [f"{c} {part}" for c in cols for part in ("mAP", "t-mAP")]
    body = [[r["attack"], r["label"], r["kind"], f"{r['eps'] * 255:.1f}", r["iters"], r["restarts"],
             *[fmt(x) for c in cols for x in (r["values"][c] or (None, None))]] for r in rows]
    return _csv([head, *body])


def table2_csv(rows: list[dict], cols: list[str]) -> str:
    parts = (("mainstay", "mainstay mAP"), ("worst_case", "worst-case mAP"), ("clean", "clean mAP"))
    head = ["defence_id", "defence", *[f"{c} {label}" for c in cols for _, label in parts]]
    body = [[r["defence"], r["label"], *[fmt((r["values"][c] or {}).get(key)) for c in cols for key, _ in parts]]
            for r in rows]
    return _csv([head, *body])


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- LaTeX
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """``text`` as literal LaTeX (one pass, so an escape is never escaped again)."""
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _TEX_SPECIAL[m.group()], str(text))


def _bold_tex(s: str) -> str:
    return rf"\textbf{{{s}}}" if s and s != MISSING_TEX else s


def table1_latex(rows: list[dict], cols: list[str], title: str) -> str:
    head = ["attack", "kind", r"$\epsilon$", "iterations", *[tex_escape(c) for c in cols]]
    body = []
    for r in rows:
        its = f"{r['iters']}" + (rf" $\times$ {r['restarts']} restarts" if r["restarts"] > 1 else "")
        body.append([tex_escape(r["label"]), tex_escape(r["kind"]), f"{r['eps'] * 255:.1f}/255", its,
                     *[_table1_cell(r["values"][c], _bold_tex, MISSING_TEX) for c in cols]])
    return _tabular("llrr" + "c" * len(cols), head, body, title)


def table2_latex(rows: list[dict], cols: list[str], title: str) -> str:
    head = ["defence", *[tex_escape(c) for c in cols]]
    body = [[tex_escape(r["label"]), *[_table2_cell(r["values"][c], _bold_tex, MISSING_TEX) for c in cols]]
            for r in rows]
    return _tabular("l" + "c" * len(cols), head, body, title)


def _tabular(spec: str, head: list[str], body: list[list[str]], title: str) -> str:
    lines = [f"% {title}", "% written by saat-dist; needs \\usepackage{booktabs}", f"\\begin{{tabular}}{{{spec}}}",
             "\\toprule", " & ".join(head) + r" \\", "\\midrule"]
    lines += [" & ".join(str(v) for v in row) + r" \\" for row in body]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- files
TABLE1_TITLE = ("Table I: attacks on the benign model; mAP (lower: a stronger untargeted attack), targeted: "
                "mAP / t-mAP in bold (higher: a stronger targeted attack)")
TABLE2_TITLE = ("Table II: defences; mAP under the mainstay attack / under the worst case over every attack "
                "(bold), clean mAP in brackets (higher: more robust)")


def write_tables(out: Path, report: dict, cols: list[str], attack_names: dict[str, str],
                 defence_names: dict[str, str], name: str = "") -> list[str]:
    """table1.csv/.tex and table2.csv/.tex in ``out`` from experiment.json's
    rows; returns their names (relative to ``out``)."""
    t1, t2 = table1_rows(report, cols, attack_names), table2_rows(report, cols, defence_names)
    where = f"experiment {name}: " if name else ""
    texts = {"table1.csv": table1_csv(t1, cols), "table1.tex": table1_latex(t1, cols, where + TABLE1_TITLE),
             "table2.csv": table2_csv(t2, cols), "table2.tex": table2_latex(t2, cols, where + TABLE2_TITLE)}
    for file, text in texts.items():
        write_text_atomic(Path(out) / file, text)
    return list(texts)
