"""`dec-ray` command line: one subcommand per use.

Exit status: 0 success; 1 finished, with rejects or failed trials worth a look; 2 bad usage or
input that stopped the job before it began; 3 a crash (an unexpected error, traceback printed);
4 the run's workers could not get their resources (what holds them is printed).
Paths are made absolute here: Ray's workers run in other directories."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional

from dec_ray.config import ConfigError
from dec_ray.data.corpus import CorpusError
from dec_ray.service.cluster import ResourcesUnavailable

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_CRASH, EXIT_NO_RESOURCES = 0, 1, 2, 3, 4


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see dec_ray/config.py for every key)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lambda_ce=0.5 (repeatable)")


def cmd_synth(args) -> int:
    from dec_ray.data.synth import synth_corpus
    info = synth_corpus(args.out, labeled=args.labeled, unlabeled=args.unlabeled, seed=args.seed,
                        min_duration=args.min_duration, max_duration=args.max_duration)
    print(f"wrote {info['labeled']} labeled and {info['unlabeled']} unlabeled clips to {args.out}")
    return 0


def cmd_ingest(args) -> int:
    from dec_ray.config import load_config
    from dec_ray.service.ingest import run_ingest
    cfg = load_config(args.config, args.overrides)
    summary = run_ingest(args.corpus, args.out, cfg, args.unlabeled or ())
    print(summary.line())
    print(f"tables: {args.out}  (rejects: {args.out}/rejects.parquet)")
    return EXIT_REJECTS if summary.rejects else EXIT_OK


def cmd_train(args) -> int:
    from dec_ray.config import load_config
    from dec_ray.service.train import run_training
    overrides = list(args.overrides)
    for flag, key in (("workers", "scale.workers"), ("epochs", "train.epochs"), ("model", "model.name")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.gpu:
        overrides.append("scale.use_gpu=true")
    if args.resume:
        summary = run_training(None, args.resume, resume=True)
    else:
        if not args.tables or not args.out:
            raise ValueError("--tables and --out are required (or --resume RUN)")
        summary = run_training(args.tables, args.out, load_config(args.config, overrides))
    print(result_line(summary, args.resume or args.out))
    return 0


def result_line(summary: dict, run: str) -> str:
    """A finished run in one line: where its result is, its best epoch, dev and test CCC."""
    def cccs(d):
        return ", ".join(f"{a} {v:.3f}" for a, v in (d or {}).items() if v is not None) or "-"
    return (f"[dec-ray] {summary['model']} done: best epoch {summary['best_epoch']} of {summary['epochs_run']}; "
            f"dev CCC {cccs(summary['dev_ccc'])}; test CCC {cccs(summary['test_ccc'])}; "
            f"{os.path.join(run, 'result.json')}")


def cmd_tune(args) -> int:
    import yaml
    from dec_ray.config import load_config
    from dec_ray.service.tune import format_table, run_tune
    overrides = list(args.overrides)
    if args.samples is not None:
        overrides.append(f"tune.samples={args.samples}")
    if args.scheduler is not None:
        overrides.append(f"tune.scheduler={args.scheduler}")
    space = None
    if args.space:
        with open(args.space) as f:
            space = yaml.safe_load(f)
    cfg = load_config(args.config, overrides)
    rows = run_tune(args.tables, args.out, cfg, space, resume=args.resume)
    print(format_table(rows, cfg.tune.metric))
    print(f"\nbest config: {args.out}/best_config.yaml  (dec-ray train --config it)\n"
          f"best checkpoint: {rows[0]['checkpoint']}\nall trials: {args.out}/trials.csv")
    return EXIT_REJECTS if any(r["error"] for r in rows) else EXIT_OK


def cmd_export(args) -> int:
    from dec_ray.report.export import export_run
    paths = export_run(args.run, args.out, onnx=not args.no_onnx)
    print("exported: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
    return EXIT_OK


def cmd_serve(args) -> int:
    from dec_ray.config import serve_config
    from dec_ray.service.serve import run_serve
    settings = serve_config(None, args.overrides)
    run_serve(args.run, args.replicas, args.gpu, args.port, args.route, args.host, max_speakers=args.max_speakers,
              population=args.population, settings=settings)
    return EXIT_OK


def cmd_predict(args) -> int:
    from dec_ray.service.batch_predict import run_predict
    info = run_predict(args.run, args.audio, args.out, args.actors, args.gpu, args.groups)
    print(f"predicted {info['predicted']} files -> {info['out']}; rejected {info['rejected']} -> {info['rejects']}")
    return EXIT_REJECTS if info["rejected"] else EXIT_OK


def cmd_evaluate(args) -> int:
    from dec_ray.report.evaluation import evaluate_runs
    from dec_ray.service.train import repeated_runs
    runs = list(args.runs or [])
    if args.tables:
        runs += repeated_runs(args.tables, args.out, args.models, args.repeats, args.config, args.overrides)
    if not runs:
        raise ValueError("give finished runs (--runs RUN ...) or --tables to train --models --repeats times")
    res = evaluate_runs(runs, args.out, args.subsets, args.seed, args.reference, args.alpha)
    print(res["table"])
    print("\nwritten: " + ", ".join(res["files"]))
    if args.cross:
        from dec_ray.report.cross_corpus import score_runs_on
        for name, folders in score_runs_on(runs, args.cross).items():
            cross = evaluate_runs(folders, os.path.join(args.out, "cross", name), args.subsets, args.seed,
                                  args.reference, args.alpha)
            how = ("normalised with that corpus's own feature statistics" if name.endswith("-adapted") else
                   "normalised with the training corpus's statistics, as deployed")
            print(f"\non {name} ({how}):\n{cross['table']}")
            print("written: " + ", ".join(cross["files"]))
    return 0


def cmd_analyze(args) -> int:
    from dec_ray.report.analysis import analyze_run, dependence_lines
    res = analyze_run(args.run, args.out, args.split, args.max_sentences, args.seed)
    print(dependence_lines(res["dependence"]))
    print(f"{res['k']} clusters of {res['chunks']} chunks; report: {args.out}/analysis.md, plots: {args.out}/*.png")
    return 0


def cmd_report(args) -> int:
    from dec_ray.service.experiment import rerender
    print(f"report: {rerender(args.out)}")
    return 0


def cmd_experiment(args) -> int:
    from dec_ray.service.experiment import load_spec, run_experiment
    spec = load_spec(args.spec)
    if args.seeds is not None:
        spec.seeds = args.seeds
    spec.cross += [c for c in args.cross if c not in spec.cross]
    res = run_experiment(args.tables, args.out, spec, args.overrides,
                         command="dec-ray " + " ".join(sys.argv[1:]))
    print(f"\nreport: {res['report']}")
    if res["failed"]:
        print(f"{len(res['failed'])} run(s) failed; re-run the same command to retry them: "
              + ", ".join(res["failed"]), file=sys.stderr)
        return EXIT_REJECTS
    return EXIT_OK


def cmd_demo(args) -> int:
    from dec_ray.demo import run_demo
    run_demo(args.out, args.labeled, args.unlabeled, args.seed, args.overrides, args.repeats, args.labels)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dec-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ray_args = argparse.ArgumentParser(add_help=False)
    ray_args.add_argument("--address", help="the Ray cluster to join (else RAY_ADDRESS, else the one `ray start` "
                                            "started for this user, else a private local Ray)")
    ray_args.add_argument("--verbose", action="store_true",
                          help="Ray's own console lines too (by default they go to Ray's logs only)")

    p = sub.add_parser("synth", help="write a small emotional-speech corpus in the MSP-Podcast layout")
    p.add_argument("out")
    p.add_argument("--labeled", type=int, default=240)
    p.add_argument("--unlabeled", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-duration", type=float, default=2.75)
    p.add_argument("--max-duration", type=float, default=11.0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", parents=[ray_args], help="featurise audio into Parquet chunk tables with Ray Data")
    p.add_argument("--corpus", help="MSP-Podcast folder or manifest .csv")
    p.add_argument("--out", required=True, help="output folder for the tables")
    p.add_argument("--unlabeled", nargs="*", help="folders or globs of unlabeled audio")
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", parents=[ray_args], help="train DeepEmoCluster or a baseline with Ray Train")
    p.add_argument("--tables", help="output folder of `dec-ray ingest`")
    p.add_argument("--out", help="run folder (checkpoints, metrics, result.json)")
    p.add_argument("--resume", metavar="RUN", help="resume an interrupted run from its folder")
    p.add_argument("--workers", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--model", choices=["deepemocluster", "cnn", "ae", "vae"])
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, mixed precision)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", parents=[ray_args], help="search lambda, K and learning rates with Ray Tune")
    p.add_argument("--tables", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int)
    p.add_argument("--scheduler", choices=["asha", "none"])
    p.add_argument("--space", help="YAML: dotted key -> {choice|loguniform|uniform|randint: args}")
    p.add_argument("--resume", action="store_true", help="resume an interrupted search in --out")
    _add_config_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", parents=[ray_args], help="batch inference with Ray Data over audio files")
    p.add_argument("--run", required=True, help="a finished training run folder (with model.pt)")
    p.add_argument("--audio", required=True, nargs="+", help="folders or globs of audio files")
    p.add_argument("--out", required=True, help="output .parquet or .csv")
    p.add_argument("--actors", type=int, default=0, help="model replicas (default: one per free CPU/GPU)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--groups", default=None,
                   help="a per-speaker model's speakers (model.norm speaker): a CSV with path and group (or "
                        "speaker) columns, a corpus folder in the MSP-Podcast layout, or 'folder' (each file's "
                        "folder; rarely a speaker). Without it, the run's population statistics")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a trained run as TorchScript + ONNX + its input contract (contract.json)")
    p.add_argument("--run", required=True, help="a finished training run folder (with model.pt)")
    p.add_argument("--out", required=True, help="the folder to write model.ts, model.onnx and contract.json to")
    p.add_argument("--no-onnx", action="store_true", help="TorchScript only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", parents=[ray_args], help="a trained run behind HTTP with Ray Serve (POST audio, get JSON)")
    p.add_argument("--run", required=True, help="a finished training run folder (with model.pt)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per replica")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept requests from other machines")
    p.add_argument("--route", default="/", help="the route prefix (default /)")
    p.add_argument("--max-speakers", type=int, default=10_000,
                   help="speakers whose statistics the service keeps (least recently used out)")
    p.add_argument("--population", default="train", choices=["train", "traffic"],
                   help="a per-speaker model's statistics for requests without a speaker: the run's Train audio "
                        "(default), or the clips served without a speaker so far, as one group (after 30)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a limit or batching setting (dec_ray.config.ServeConfig), e.g. --set max_duration_s=30 "
                        "--set max_batch_size=32; defaults: max_body_mb 16, max_duration_s 60, sample rates "
                        "8000-192000 Hz, max_batch_size 16, batch_wait_timeout_s 0.01")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("evaluate", parents=[ray_args],
                       help="the paper's protocol: 4 test subsets x R runs, mean/std, t-test, plot")
    p.add_argument("--runs", nargs="+", help="finished run folders (any mix of models)")
    p.add_argument("--tables", help="train the runs first: each of --models, --repeats times (seeds 0..R-1)")
    p.add_argument("--models", nargs="+", default=["deepemocluster", "cnn", "ridge", "egemaps"],
                   choices=["deepemocluster", "cnn", "ae", "vae", "recommended", "ridge", "egemaps", "egemaps-speaker"],
                   help="the networks, `recommended` (the preset of that name laid over --config), and the "
                        "linear references: ridge (log-mel utterance statistics), egemaps (eGeMAPS "
                        "functionals, Train normalisation), egemaps-speaker (eGeMAPS, per-speaker normalisation)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True, help="report folder (evaluation.md/.csv/.png; runs/ when training)")
    p.add_argument("--subsets", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the random test subsets")
    p.add_argument("--reference", default="deepemocluster", help="the model each baseline is tested against")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--cross", nargs="+", metavar="NAME=TABLES", default=[],
                   help="also score every run on these corpora's test splits (tables of `dec-ray ingest`): "
                        "one table per corpus under OUT/cross/NAME")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("analyze", help="cluster analysis of a run: per-cluster attributes, dependence, plots")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "dev", "test"])
    p.add_argument("--max-sentences", type=int, default=5000, help="even subsample of larger splits")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("experiment", parents=[ray_args],
                       help="the paper's studies (models, pool size, K) as one resumable Ray Tune grid + report.md")
    p.add_argument("--tables", required=True, help="output folder of `dec-ray ingest`")
    p.add_argument("--out", required=True, help="experiment folder: runs/, report.md; re-run to resume")
    p.add_argument("--spec", default="experiment_laptop",
                   help="experiment spec (YAML) or a preset name: experiment_laptop (default)")
    p.add_argument("--seeds", type=int, help="runs per cell (overrides the spec's seeds)")
    p.add_argument("--cross", nargs="+", metavar="NAME=TABLES", default=[],
                   help="also score every run on these corpora's test splits (their `dec-ray ingest` "
                        "tables): a section of the report per corpus (adds to the spec's cross)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the spec's training config for every run (repeatable)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("report", help="write an experiment's report.md again from its saved values "
                                      "(ccc_values*.csv) with the current tests; no runs or tables needed")
    p.add_argument("--out", required=True, help="the experiment folder (report.md, ccc_values.csv, spec.yaml)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", parents=[ray_args],
                       help="synth corpus -> ingest -> train DeepEmoCluster and the CNN baseline")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--labeled", type=int, default=240)
    p.add_argument("--unlabeled", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="training runs per model for the evaluation")
    p.add_argument("--labels", type=float, default=0.25,
                   help="the share of Train that keeps its labels (the rest joins the unlabeled pool); "
                        "1: the published, fully labeled setting")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return parser


PATH_ARGS = ("corpus", "out", "tables", "unlabeled", "run", "audio", "runs", "resume", "config", "space", "spec")
# --cross NAME=TABLES: report/cross_corpus.parse_corpus makes its path absolute


def absolute_paths(args: argparse.Namespace) -> None:
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not (name in ("config", "spec") and not os.path.exists(value)):  # presets
            setattr(args, name, os.path.abspath(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.abspath(v) for v in value])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    absolute_paths(args)
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address          # Ray's own convention, for every ray.init
    if getattr(args, "verbose", False):
        os.environ["DEC_RAY_VERBOSE"] = "1"               # read by dec_ray.service.console
    try:
        return args.func(args)
    except (ConfigError, CorpusError, FileNotFoundError, ValueError) as e:
        print(f"dec-ray {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ResourcesUnavailable as e:
        print(f"dec-ray {args.command}: stopped (exit {EXIT_NO_RESOURCES}): {e}", file=sys.stderr)
        return EXIT_NO_RESOURCES
    except KeyboardInterrupt:
        raise
    except Exception:
        traceback.print_exc()
        print(f"dec-ray {args.command}: crashed (exit {EXIT_CRASH}); outputs are not marked complete", file=sys.stderr)
        return EXIT_CRASH
