"""The `saat-dist` command.

  saat-dist run --config configs/demo.yaml            the whole protocol
  saat-dist experiment --config configs/experiments/demo.yaml
                                                      hash x bits x defence x attack grid, Tables I/II
  saat-dist train|saat|evaluate|report --config ...   one stage, in the run directory
  saat-dist data demo --out DIR [--seed S]            build the embedded demo data set
  saat-dist data convert --root DIR --out DIR         DeepHash list format -> WebDataset shards
  saat-dist bench map|mainstay|saat-step|eval|stream|soak|all --out DIR  benchmarks (JSON in DIR)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saat-dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("run", "run every stage"),
                        ("experiment", "the protocol over a grid of hash loss x bits x defence x attack "
                                       "(experiment.json/md, plots); a rerun skips finished cells"),
                        ("train", "benign hashing training"),
                        ("saat", "SAAT adversarial training from the benign model"),
                        ("evaluate", "evaluate the benign and/or SAAT model"),
                        ("report", "write report.json/md and plots")]:
        p = sub.add_parser(name, help=help_)
        _config_args(p)
        p.add_argument("--address", help="Ray cluster to join (default: start a local Ray); sets distributed.address")
        if name in ("run", "train", "saat"):
            p.add_argument("--resume", nargs="?", const="auto", choices=["auto", "off"],
                           help="auto (the same as plain --resume): skip finished stages and continue an interrupted "
                                "one from the newest complete checkpoint under the storage path; off: start afresh "
                                "(default: the config's resume key)")
        if name == "evaluate":
            p.add_argument("--which", choices=["benign", "saat", "both"], default="both")

    data = sub.add_parser("data", help="data sets and shards").add_subparsers(dest="data_command", required=True)
    conv = data.add_parser("convert", help="DeepHash list format -> WebDataset shards")
    conv.add_argument("--root", required=True, help="data set root with {train,test,database}_{img,label}.txt")
    conv.add_argument("--out", required=True, help="output shard directory")
    conv.add_argument("--shard-size", type=int, default=1000, help="target samples per shard")
    conv.add_argument("--shard-multiple", type=int, default=12,
                      help="shard counts are rounded up to a multiple of this (ranks x loader workers)")
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

    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench.add_argument("which", choices=["map", "mainstay", "saat-step", "eval", "stream", "soak", "all"])
    bench.add_argument("--out", default="bench-results", help="directory for <which>.json")
    bench.add_argument("--small", action="store_true", help="small sizes (a smoke run, not the target sizes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr (``saat-dist: error: ...``): exit 2
    for bad input (config, data, shards, manifests, checkpoints), 1 for a run
    that failed otherwise. ``--debug`` shows the traceback instead."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
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


def _bad_input_errors() -> tuple[type, ...]:
    from saat_dist.checkpoint import CheckpointError
    from saat_dist.config import ConfigError
    from saat_dist.data.listformat import DataFormatError
    from saat_dist.data.shards import ManifestError
    from saat_dist.data.decode import ShardError

    return ConfigError, DataFormatError, ManifestError, ShardError, CheckpointError, FileNotFoundError


def _main(args) -> int:
    from saat_dist.config import load_config

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
    overrides = list(args.overrides) + ([f"distributed.address={args.address}"] if args.address else [])
    cfg = load_config(args.config, overrides)  # bad configs fail here, before any work
    for warning in cfg.warnings():
        logging.getLogger("saat_dist").warning("config: %s", warning)
    return _stage(args, cfg)


def _data(args) -> int:
    if args.data_command == "convert":
        from saat_dist.data.convert import convert

        manifest = convert(args.root, args.out, args.shard_size, args.shard_multiple)
        print(json.dumps({s: {"count": v["count"], "shards": len(v["shards"])} for s, v in manifest["splits"].items()}))
        return 0
    from saat_dist.data.demo import DemoSpec, build_demo

    lo, hi = (1, 1) if args.single_label else (args.min_digits, args.max_digits)
    summary = build_demo(args.out, DemoSpec(train=args.train, query=args.query, database=args.database,
                                            min_digits=lo, max_digits=hi, seed=args.seed, shard_size=args.shard_size,
                                            colour=args.colour, clutter=args.clutter))
    print(json.dumps(summary, indent=1))
    return 0


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
    if args.command == "run":
        report = pipeline.run_all(cfg, resume=_resume(args, cfg))
        print(json.dumps({k: report[k] for k in ("random_map", "benign", "saat", "stage_seconds")}, indent=1, default=str)[:4000])
        return 0
    if args.command != "report":
        pipeline.ensure_data(cfg)  # untrusted manifests are checked before anything is written
    run_dir = pipeline.prepare_run_dir(cfg)
    if args.command == "train":
        pipeline.stage_train(cfg, run_dir, resume=_resume(args, cfg))
    elif args.command == "saat":
        pipeline.stage_saat(cfg, run_dir, resume=_resume(args, cfg))
    elif args.command == "evaluate":
        for which in (["benign", "saat"] if args.which == "both" else [args.which]):
            pipeline.stage_evaluate(cfg, run_dir, which)
    elif args.command == "report":
        write_run_report(cfg, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
