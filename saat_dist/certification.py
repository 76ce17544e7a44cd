"""``saat-dist certify``: certified robustness of the models of a run
directory, with what it needs trained first.

For each name of ``certify.models`` ('none': the benign model; the others:
defences of ``saat_dist.defences``, e.g. ``gaussian`` and ``saat_noise``,
the noise-trained models a certificate wants): the model is trained if its
``model.pt`` is missing (an interrupted training continues), then certified
(``evaluation.certify_stage``, one stage per model, on Ray or in this
process), unless a certify.json of the same settings and model file is
there. Then ``certify.md``, ``certify_summary.json`` and the plot
``plots/certified_map.png`` (and PDF) in the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from saat_dist.checkpoint import file_sha256, write_text_atomic
from saat_dist.config import RunConfig, save_config
from saat_dist.evaluation.certify_report import certify_figure, certify_markdown
from saat_dist.evaluation.certify_stage import CERTIFY_RESULTS, CertifyStage
from saat_dist.pipeline import check_layout, ensure_data, launch, record_stage, train
from saat_dist.stages import DEFENCE_STAGES, TRAIN, model_folder

log = logging.getLogger("saat_dist")


def certify_spec(cfg: RunConfig, run_dir: Path, folder: str) -> dict:
    """What a certification depends on: its settings, the query and image
    settings, and the model file."""
    import dataclasses

    # not the model list, the chunking or the batching: they change no number
    settings = {k: v for k, v in dataclasses.asdict(cfg.certify).items() if k not in ("models", "batch_size",
                                                                                     "query_batch")}
    return {"certify": settings, "seed": cfg.seed, "top_k": cfg.eval.top_k,
            "images": [cfg.data.image_size, cfg.data.resize], "model": file_sha256(run_dir / folder / "model.pt")}


def certify_models(cfg: RunConfig, run_dir: Path, models: list[str], source) -> dict[str, dict]:
    """Train what is missing, certify what is not certified with these
    settings; returns {model name: certify.json}."""
    for name in models:
        stage = TRAIN if name == "none" else DEFENCE_STAGES[name]
        if (run_dir / stage.out / "model.pt").is_file():
            continue
        log.info("certify: training %s (its model is missing)", stage.out)
        train(cfg, stage, run_dir, resume=True)
    out = {}
    for name in models:
        folder = model_folder(name)
        path = run_dir / folder / CERTIFY_RESULTS
        spec = certify_spec(cfg, run_dir, folder)
        if path.is_file() and json.loads(path.read_text()).get("spec") == spec:
            log.info("certify: %s certified with these settings, skipping", folder)
        else:
            log.info("certify: %s (%d queries, sigma %g, radii %s)", folder, cfg.certify.num_queries,
                     cfg.certify.sigma, cfg.certify.radii)
            launch(cfg, CertifyStage(folder), run_dir, source=source)
            res = json.loads(path.read_text())
            res["spec"] = spec
            write_text_atomic(path, json.dumps(res, indent=1))
        out[name] = json.loads(path.read_text())
    return out


def run_certify(cfg: RunConfig) -> dict:
    """``saat-dist certify``: the models of ``certify.models``, their
    certificates, certify.md / certify_summary.json and the plot."""
    from saat_dist.evaluation.report import DEFENCE_NAMES, pdf_of, pyplot, save_figure

    t0 = time.monotonic()
    source = ensure_data(cfg)
    models = list(dict.fromkeys(cfg.certify.models))
    unknown = [m for m in models if m != "none" and m not in DEFENCE_STAGES]
    if unknown:
        from saat_dist.config import ConfigError

        raise ConfigError(f"certify.models: {unknown} are not 'none' or a defence ({sorted(DEFENCE_STAGES)})")
    check_layout(cfg, source, [TRAIN, *(DEFENCE_STAGES[m] for m in models if m != "none")])
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    results = certify_models(cfg, run_dir, models, source)
    labels = {DEFENCE_NAMES.get(m, m): r for m, r in results.items()}
    (run_dir / "plots").mkdir(exist_ok=True)
    plot = save_figure(certify_figure(labels, pyplot()), run_dir / "plots" / "certified_map.png", run_dir)
    summary = {"models": {m: {k: v for k, v in r.items() if k != "per_query_hamming_radius"}
                          for m, r in results.items()}, "plots": [plot], "plots_pdf": [pdf_of(plot)]}
    write_text_atomic(run_dir / "certify_summary.json", json.dumps(summary, indent=1))
    md = ["# Certified robustness", *certify_markdown(labels, "Certified mAP per radius"), "",
          f"![certified mAP vs radius]({plot})", ""]
    write_text_atomic(run_dir / "certify.md", "\n".join(md))
    record_stage(run_dir, "certify", time.monotonic() - t0)
    return summary
