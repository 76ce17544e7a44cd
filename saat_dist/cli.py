"""The `saat-dist` command.

  saat-dist run --config configs/demo.yaml            the whole protocol
  saat-dist experiment --config configs/experiments/demo.yaml
                                                      hash x bits x defence x attack grid, Tables I/II
  saat-dist train|saat|evaluate|report --config ...   one stage, in the run directory
  saat-dist certify --config ...                      certified robustness (center smoothing) of certify.models
  saat-dist config show|check [--config F|--preset NAME] [--set K=V]
                                                      the resolved config with descriptions; check it
  saat-dist config schema                             the config's JSON Schema
  saat-dist data demo --out DIR [--seed S]            build the embedded demo data set
  saat-dist data convert --root DIR --out DIR         DeepHash list format -> WebDataset shards
  saat-dist bench map|mainstay|saat-step|eval|stream|convert|cost|modes|soak|all --out DIR  benchmarks (JSON in DIR)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from saat_dist.console import configure_logging


def _config_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", help="YAML run config (default: built-in defaults)")
    source.add_argument("--preset", metavar="NAME",
                        help="a config shipped with the package, e.g. demo, tiny, paper/nus-wide")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=2 or attack.eps=16/255 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saat-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from saat_dist import __version__

    parser.add_argument("--version", action="version", version=f"saat-dist {__version__}")
    _global_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "run every stage"),
                        ("experiment", "the protocol over a grid of hash loss x bits x defence x attack "
                                       "(experiment.json/md, plots); a rerun skips finished cells"),
                        ("train", "benign hashing training"),
                        ("saat", "SAAT adversarial training from the benign model"),
                        ("evaluate", "evaluate the benign and/or SAAT model"),
                        ("report", "write report.json/md and plots"),
                        ("certify", "certified robustness by center smoothing of certify.models (trained first "
                                    "when missing): certify.md, certify_summary.json, plots")]:
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.add_argument("--address", help="Ray cluster to join (default: start a local Ray); sets distributed.address")
        if name in ("run", "train", "saat"):
            p.add_argument("--resume", nargs="?", const="auto", choices=["auto", "off"],
                           help="auto (the same as plain --resume): skip finished stages and continue an interrupted "
                                "one from the newest complete checkpoint under the storage path; off: start afresh "
                                "(default: the config's resume key)")
        if name == "run":
            p.add_argument("--json", action="store_true",
                           help="print the whole report as JSON instead of the summary table and paths")
        if name == "evaluate":
            p.add_argument("--which", choices=["benign", "saat", "both"], default="both")
            p.add_argument("--model-file", metavar="PATH",
                           help="evaluate your own state_dict instead (keys and shapes of the configured model, "
                                "model.factory's module if set; read as untrusted: weights only); results in "
                                "<output_dir>/model_file/eval.json")

    data = sub.add_parser("data", help="data sets and shards").add_subparsers(dest="data_command", required=True)
    conv = data.add_parser("convert", help="DeepHash list format -> WebDataset shards")
    conv.add_argument("--root", required=True, help="data set root with {train,test,database}_{img,label}.txt")
    conv.add_argument("--out", required=True, help="output shard directory")
    conv.add_argument("--shard-size", type=int, default=1000, help="target samples per shard")
    conv.add_argument("--shard-multiple", type=int, default=12,
                      help="shard counts are rounded up to a multiple of this (ranks x loader workers)")
    conv.add_argument("--workers", type=int, default=None,
                      help="processes that check the images and write the shards (default: one per CPU)")
    demo = data.add_parser("demo", help="build the embedded multi-label MNIST-mosaic data set")
    demo.add_argument("--out", required=True, help="output directory (list format in list/, shards in shards/)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train", type=int, default=2000)
    demo.add_argument("--query", type=int, default=500)
    demo.add_argument("--database", type=int, default=5000)
    demo.add_argument("--min-digits", type=int, default=1)
    demo.add_argument("--max-digits", type=int, default=3)
    demo.add_argument("--single-label", action="store_true", help="one digit per image (one-hot labels)")
    demo.add_argument("--colour", action="store_true", help="harder variant: random background and digit colours")
    demo.add_argument("--clutter", type=int, default=0,
                      help="harder variant: stroke fragments of non-label digits per mosaic")
    demo.add_argument("--shard-size", type=int, default=500)

    from saat_dist.distributed import local_cluster

    local_cluster.add_arguments(sub.add_parser(
        "cluster", help="a Ray cluster of several nodes on this machine, to try multi-node runs and failures "
                        "(launch/local-cluster.sh)"))

    config = sub.add_parser("config", help="print the resolved config, check it, or print its JSON Schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _config_args(config_sub.add_parser("show", help="the resolved config as YAML, every key with its description"))
    _config_args(config_sub.add_parser("check", help="'ok: <source>' and the config's warnings, or the error (exit 2)"))
    config_sub.add_parser("schema", help="the config's JSON Schema (docs/config.schema.json)")

    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench.add_argument("which", choices=["map", "mainstay", "saat-step", "eval", "stream", "convert", "cost", "modes",
                                         "soak", "all"])
    bench.add_argument("--out", default="bench-results", help="directory for <which>.json")
    bench.add_argument("--small", action="store_true", help="small sizes (a smoke run, not the target sizes)")
    for leaf in _leaf_parsers(parser):  # --debug and --log-level anywhere on the line
        _global_args(leaf, top=False)
    return parser


def _global_args(p: argparse.ArgumentParser, top: bool) -> None:
    """The options every sub-command takes too; after the sub-command they
    default to SUPPRESS so the top-level value is kept when they are absent."""
    from saat_dist.console import LEVELS

    quiet = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure", **quiet)
    p.add_argument("--log-level", choices=LEVELS, default="info" if top else argparse.SUPPRESS,
                   help="info (default): the run's progress and results; debug: also every line of Ray, "
                        "DeepSpeed and torch")


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr (``saat-dist: error: ...``): exit 2
    for bad input (config, data, shards, manifests, checkpoints), 1 for a run
    that failed otherwise. ``--debug`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return _main(args)
    except SystemExit:
        raise
    except BaseException as e:
        if args.debug or isinstance(e, KeyboardInterrupt):
            raise
        print(f"saat-dist: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, _bad_input_errors()) or getattr(e, "bad_input", False) else 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


_BAD_INPUT = {"saat_dist.config": "ConfigError", "saat_dist.data.listformat": "DataFormatError",
              "saat_dist.data.shards": "ManifestError", "saat_dist.data.decode": "ShardError",
              "saat_dist.checkpoint": "CheckpointError"}


def _bad_input_errors() -> tuple[type, ...]:
    # only the modules already imported: an error of a class can only come from its module, and
    # importing the config (torch with it) to classify a `cluster` command's error costs 4 CPU-s
    loaded = [getattr(sys.modules[m], name) for m, name in _BAD_INPUT.items() if m in sys.modules]
    return (*loaded, FileNotFoundError)


def _main(args) -> int:
    if args.command == "config":
        from saat_dist.config import config_command

        return config_command(args.config_command, getattr(args, "config", None), getattr(args, "preset", None),
                              getattr(args, "overrides", []))
    if args.command == "data":
        return _data(args)
    if args.command == "cluster":
        from saat_dist.distributed.local_cluster import command

        print(json.dumps(command(args), indent=1))
        return 0
    if args.command == "bench":
        from saat_dist.bench import run_bench

        print(json.dumps(run_bench(args.which, Path(args.out), small=args.small), indent=1))
        return 0
    from saat_dist.config import load_config  # imports torch: not for `cluster` (a node's CLI) or `data`

    overrides = list(args.overrides) + ([f"distributed.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides, preset=args.preset)  # bad configs fail here, before any work
    for warning in cfg.warnings():
        logging.getLogger("saat_dist").warning("config: %s", warning)
    if getattr(cfg.model, "factory", None) and args.command != "report":
        from saat_dist.models.model_file import build_model

        build_model(cfg.model, cfg.seed, "cpu", image_size=cfg.data.image_size)  # a factory that does not fit fails now
    return _stage(args, cfg)


def _data(args) -> int:
    if args.data_command == "convert":
        from saat_dist.data.convert import convert

        manifest = convert(args.root, args.out, args.shard_size, args.shard_multiple, workers=args.workers)
        print(json.dumps({s: {"count": v["count"], "shards": len(v["shards"])} for s, v in manifest["splits"].items()}))
        return 0
    from saat_dist.data.demo import DemoSpec, build_demo

    lo, hi = (1, 1) if args.single_label else (args.min_digits, args.max_digits)
    summary = build_demo(args.out, DemoSpec(train=args.train, query=args.query, database=args.database,
                                            min_digits=lo, max_digits=hi, seed=args.seed, shard_size=args.shard_size,
                                            colour=args.colour, clutter=args.clutter))
    print(json.dumps(summary, indent=1))
    return 0


SUMMARY_ROWS = (("clean mAP", "clean_map"), ("mainstay-attack mAP", "attacked_map"),
                ("strong-attack mAP", "attacked_map_strong"), ("targeted t-mAP (lower: more robust)", "targeted_tmap"))


def run_summary(report: dict, run_dir: Path) -> str:
    """What `run` prints when it succeeds: a short table of the headline
    numbers (with the attack's budget) and where everything else is."""
    models = [m for m in ("benign", "saat") if isinstance(report.get(m), dict)]
    lines = [f"{'':38}" + "".join(f"{m:>10}" for m in models)]
    for label, key in SUMMARY_ROWS:
        values = [report[m].get(key) for m in models]
        if any(v is not None for v in values):
            lines.append(f"{label:38}" + "".join(f"{v:>10.4f}" if v is not None else f"{'n/a':>10}"
                                                   for v in values))
    if report.get("random_map") is not None:
        lines.append(f"{'random-code mAP (floor)':38}{report['random_map']:>10.4f}")
    attack = report.get("attack") or {}
    if "eps" in attack:
        lines.append(f"attack budget: eps {attack['eps'] * 255:.3g}/255, {attack.get('iters')} iterations "
                     f"(strong check: x{attack.get('strong_factor')} iterations, {attack.get('strong_restarts')} "
                     "restarts)")
    seconds = report.get("stage_seconds") or {}
    if seconds:
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if isinstance(v, (int, float))))
    lines += [f"report: {run_dir / 'report.md'}", f"numbers: {run_dir / 'report.json'}"]
    plots = report.get("plots") or []
    if plots:
        lines.append(f"plots: {len(plots)} PNG (+ PDF) in {run_dir / Path(plots[0]).parent}")  # run_dir / abs = abs
    return "\n".join(lines)


def _resume(args, cfg) -> bool:
    """--resume on the line, else the config's ``resume`` key."""
    return (getattr(args, "resume", None) or cfg.resume) == "auto"


def _stage(args, cfg) -> int:
    from saat_dist import pipeline
    from saat_dist.evaluation.report import write_run_report

    if args.command == "experiment":
        from saat_dist.experiment import run_experiment

        report = run_experiment(cfg)
        print(json.dumps({"checks": report["checks"], "orderings": report["orderings"],
                          "report": str(Path(cfg.output_dir) / "experiment.md")}, indent=1))
        return 0
    if args.command == "certify":
        from saat_dist.certification import run_certify

        summary = run_certify(cfg)
        print(json.dumps({m: {"smoothed_clean_map": r["smoothed_clean_map"],
                              "certified_map": {f"{row['radius_l2']:g}": row["certified_map"] for row in r["radii"]},
                              "attack_violations": sum(row["attack_check"]["violations"] for row in r["radii"])}
                          for m, r in summary["models"].items()} | {"report": str(Path(cfg.output_dir) / "certify.md")},
                         indent=1))
        return 0
    if args.command == "run":
        report = pipeline.run_all(cfg, resume=_resume(args, cfg))
        if args.json:
            print(json.dumps(report, indent=1, default=str))
        else:
            print(run_summary(report, Path(cfg.output_dir)))
        return 0
    if args.command == "evaluate" and args.model_file:
        res = pipeline.evaluate_model_file(cfg, Path(args.model_file))
        print(json.dumps({"model_file": args.model_file, "clean_map": res["clean_map"],
                          "attacks": {k: v["map"] for k, v in res["attacks"].items()},
                          "worst_case_map": res.get("worst_case", {}).get("map"),
                          "results": str(Path(cfg.output_dir) / pipeline.MODEL_FILE_FOLDER / pipeline.RUN_RESULTS)}, indent=1))
        return 0
    if args.command != "report":
        pipeline.ensure_data(cfg)  # untrusted manifests are checked before anything is written
    run_dir = pipeline.prepare_run_dir(cfg)
    if args.command == "train":
        pipeline.stage_train(cfg, run_dir, resume=_resume(args, cfg))
        written = [run_dir / "benign" / "model.pt", run_dir / "benign" / "train.json"]
    elif args.command == "saat":
        pipeline.stage_saat(cfg, run_dir, resume=_resume(args, cfg))
        written = [run_dir / "saat" / "model.pt", run_dir / "saat" / "train.json"]
    elif args.command == "evaluate":
        which = ["benign", "saat"] if args.which == "both" else [args.which]
        for folder in which:
            pipeline.stage_evaluate(cfg, run_dir, folder)
        written = [run_dir / folder / "eval.json" for folder in which]
    else:
        write_run_report(cfg, run_dir)
        written = [run_dir / "report.md", run_dir / "report.json"]
    print(f"{args.command}: done; wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
