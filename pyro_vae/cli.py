"""The ``pyro-vae`` command: train, evaluate, sample, plot, compare, compare-runs, score, embed, gaps, impute.

Each subcommand is one entry of :data:`SUBCOMMANDS` (its arguments and the function that runs
it); each run function calls one function of the library. Mistakes in configs, specs, data
or run folders print one clean message and exit with status 2; ``PYRO_VAE_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Variational autoencoders on Pyro and PyTorch.

examples:
  pyro-vae train --config configs/mnist.toml
  pyro-vae train --config configs/mnist.toml --set model.prior="mixture(components=10)" --out runs/mix
  pyro-vae train --resume --out runs/mix --set train.epochs=40
  pyro-vae evaluate --run runs/mix --nll-samples 5000 --json
  pyro-vae evaluate --run runs/mix --nll "ais(steps=1000, leapfrog=10, chains=16)" --json
  pyro-vae sample --run runs/mix --num 64 --out samples.png
  pyro-vae plot --run runs/mix
  pyro-vae compare --run runs/mix --estimators "trace,meanfield,iwae(k=50)"
  pyro-vae compare-runs runs/mix runs/vamp
  pyro-vae score --run runs/mix --data fashion-mnist --out ood.png
  pyro-vae embed --run runs/mix --out codes.npz --probe
  pyro-vae gaps --run runs/mix --num 100
  pyro-vae impute --run runs/miwae --samples 1000 --out imputations.png --json

Run "pyro-vae COMMAND --help" for a command's options. Docs: docs/training.md.
"""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its one-line help, a longer description, how to add its arguments, what it runs."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- shared arguments -------------------------------------------------------------------------------
def _run_dir_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, metavar="DIR", help="a run folder written by train")
    _device_data_args(parser)


def _device_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="data root (default: $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)",
    )


# -- train ------------------------------------------------------------------------------------------------
def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="a TOML config (optional with --resume)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='override a config key, e.g. --set train.epochs=5 --set model.prior="vamp(components=500)"',
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="run folder (default: runs/<config name>-<YYYYmmdd-HHMMSS>)"
    )
    _device_data_args(parser)
    parser.add_argument("--seed", type=int, metavar="N", help="same as --set train.seed=N")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    parser.add_argument("--download", action="store_true", help="download a missing dataset (never done otherwise)")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show a bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="plain lines, never a bar")


def default_out_dir(config_path: Path | None, now: float | None = None) -> Path:
    """``runs/<config stem>-<YYYYmmdd-HHMMSS>``."""
    stem = config_path.stem if config_path is not None else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def _run_train(args: argparse.Namespace) -> int:
    from pyro_vae.checks import load_config
    from pyro_vae.train import DivergenceError, NonFiniteLossError, train
    from pyro_vae.train.distributed import session

    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    config_path = args.config
    if args.resume:
        if args.out is None:
            raise _UsageError("--resume needs --out DIR, the run folder to continue")
        if config_path is None:
            config_path = args.out / "config.toml"
            if not config_path.is_file():
                raise _UsageError(f"nothing to resume: {config_path} does not exist")
    elif config_path is None:
        raise _UsageError("train needs --config FILE (or --resume --out DIR)")
    cfg = load_config(config_path, overrides)
    out = args.out or default_out_dir(args.config)
    try:
        # Under torchrun, one process per device for this run: NCCL on cuda:LOCAL_RANK or gloo on the
        # CPU (docs/distributed.md); otherwise the one process on the requested device.
        with session(cfg.train.device if args.device == "auto" else args.device) as context:
            result = train(
                cfg,
                out,
                device=context.device,
                data_dir=args.data_dir,
                resume=args.resume,
                progress=args.progress,
                download=args.download,
                context=context,
            )
    except (NonFiniteLossError, DivergenceError) as err:  # the run stopped; its folder is resumable
        print(f"pyro-vae train: {err}", file=sys.stderr)
        return EXIT_FAILED
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    if context.is_main:  # under torchrun, rank 0 alone names the run folder
        print(result["run_dir"])
    return 0


# -- evaluate -------------------------------------------------------------------------------------------
CONTRACT_KEYS = ("test_elbo", "test_nll", "test_nll_se", "bits_per_dim", "num_examples")


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument(
        "--nll-samples",
        type=_positive_or_zero,
        default=None,
        metavar="K",
        help="importance samples per example for the NLL, short for --nll 'is(samples=K)'; 0 skips it (default: 5000)",
    )
    parser.add_argument(
        "--nll",
        default=None,
        metavar="SPEC",
        help="the NLL method: 'is(samples=K)' (importance sampling, the default with K=5000) or "
        "'ais(steps=T, leapfrog=L, chains=C, start='prior'|'guide', schedule='sigmoid'|'linear', "
        "gradient_precision='ieee'|'bf16'|'tf32', record=True|False)' "
        "(annealed importance sampling, Wu et al. 2017)",
    )
    parser.add_argument(
        "--bdmc",
        type=_positive,
        default=None,
        metavar="N",
        help="instead of the test-set report: bidirectional Monte Carlo on N examples simulated from the model, "
        "forward (lower) and reverse (upper) AIS with the settings of --nll 'ais(...)' (default: ais())",
    )
    parser.add_argument(
        "--subset", type=_positive, default=None, metavar="N", help="evaluate N evenly spaced examples only"
    )
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument(
        "--save",
        action="store_true",
        help="write the result into the run folder (replacing evaluation.json, with evaluation.npz: the "
        "per-example numbers compare-runs pairs)",
    )


def _run_evaluate(args: argparse.Namespace) -> int:
    from pyro_vae.ais import bdmc_run
    from pyro_vae.evaluate import evaluate_run

    if args.nll is not None and args.nll_samples is not None:
        raise _UsageError("give --nll or --nll-samples, not both (--nll-samples K is --nll 'is(samples=K)')")
    if args.bdmc is not None:
        if args.nll_samples is not None or args.subset is not None:
            raise _UsageError(
                "--bdmc simulates its own data and runs AIS: it takes --nll 'ais(...)', not --nll-samples or --subset"
            )
        result = bdmc_run(args.run, args.bdmc, nll=args.nll, device=args.device)
        keys = ("forward_log_px", "reverse_log_px", "gap", "forward_acceptance_rate", "reverse_acceptance_rate")
        return _print_result(result, args.json, ("ais_method", "bdmc_num", *keys))
    nll_samples = 5000 if args.nll_samples is None else args.nll_samples
    result = evaluate_run(
        args.run,
        nll_samples=nll_samples,
        device=args.device,
        data_dir=args.data_dir,
        subset=args.subset,
        nll=args.nll,
        save=args.save,
    )
    # The contract's keys, then any number of the structure's own (M2's test_accuracy).
    own = [key for key in result if key.startswith("test_") and key not in CONTRACT_KEYS and "nll" not in key]
    return _print_result(result, args.json, (*CONTRACT_KEYS, *own, "nll_method", "ais_acceptance_rate"))


def _print_result(result: dict[str, Any], as_json: bool, keys: Sequence[str]) -> int:
    """The whole result as JSON, or one line per key present (and the warning, if any)."""
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    for key in (key for key in keys if key in result):
        value = result[key]
        print(f"{key:>14}  {value:.4f}" if isinstance(value, float) else f"{key:>14}  {value}")
    if result.get("warning"):
        print(f"warning: {result['warning']}")
    return 0


# -- sample -------------------------------------------------------------------------------------------------
def _sample_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument("--num", type=_positive, default=64, metavar="N", help="how many samples (default: 64)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="where to write the image grid")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for the draws (default: 0)")


def _run_sample(args: argparse.Namespace) -> int:
    import pyro

    from pyro_vae.plots import sample_figure
    from pyro_vae.runs import load_run

    run = load_run(args.run, device=args.device, data_dir=args.data_dir, load_data=False)
    pyro.set_rng_seed(args.seed)
    print(sample_figure(run.vae, run.image_shape, args.num, args.out))
    return 0


# -- plot -----------------------------------------------------------------------------------------------------
def _plot_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)


def _run_plot(args: argparse.Namespace) -> int:
    from pyro_vae.plots import write_all_figures
    from pyro_vae.runs import load_run

    run = load_run(args.run, device=args.device, data_dir=args.data_dir)
    written = write_all_figures(run.vae, run.dataset, run.metrics, run.path)
    for path in written:
        print(path)
    return 0


# -- compare -------------------------------------------------------------------------------------------------
def _compare_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument(
        "--estimators",
        required=True,
        metavar="SPECS",
        help='comma-separated estimator specs, e.g. "trace,meanfield,closed_form,iwae(k=50)"',
    )
    parser.add_argument("--repeats", type=_positive, default=100, metavar="R", help="repeats (default: 100)")
    parser.add_argument("--batch", type=_positive, default=None, metavar="B", help="test examples used")
    parser.add_argument(
        "--per-example",
        action="store_true",
        help="the gradient SNR of each example's own gradient, averaged over the examples (the protocol of "
        "Rainforth et al. 2018), instead of that of the batch-mean gradient",
    )
    parser.add_argument(
        "--snr-aggregate",
        choices=("mean", "median", "rms", "norm"),
        default="mean",
        help="how a group's per-parameter SNRs make one number: their mean, their median, their bias-corrected "
        "root mean square, or the SNR of the gradient vector (bias-corrected ||E g|| / sqrt(tr Cov g)) "
        "(default: mean)",
    )
    parser.add_argument(
        "--chunk",
        type=_positive,
        default=None,
        metavar="N",
        help="evaluate the batch N examples at a time (the gradients add up; for large k)",
    )
    parser.add_argument(
        "--weights",
        choices=("best", "last", "initial"),
        default="best",
        help="best.pt, the last checkpoint, or the untrained model of the run's config and seed (default: best)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws (default: 0)")
    parser.add_argument(
        "--slope-k-min",
        type=_positive,
        default=10,
        metavar="K",
        help="fit the log-log slope of SNR against k over k >= K (default: 10)",
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the reports go (default: the run folder)")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")


def _run_compare(args: argparse.Namespace) -> int:
    from pyro_vae.compare import compare_run
    from pyro_vae.specs import split_specs

    specs = split_specs(args.estimators)
    if not specs:
        raise _UsageError("--estimators is empty; e.g. --estimators trace,meanfield")
    kwargs: dict[str, Any] = {
        "estimators": specs,
        "repeats": args.repeats,
        "device": args.device,
        "per_example": args.per_example,
        "snr_aggregate": args.snr_aggregate,
        "chunk": args.chunk,
        "weights": args.weights,
        "seed": args.seed,
        "out_dir": args.out,
        "slope_k_min": args.slope_k_min,
    }
    if args.batch is not None:
        kwargs["batch_size"] = args.batch
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    result = compare_run(args.run, **kwargs)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        from pyro_vae.compare import markdown_table

        print(markdown_table(result, slope_k_min=args.slope_k_min))
    return 0


# -- compare-runs --------------------------------------------------------------------------------------------
def _compare_runs_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="run folders (their evaluation.json) or evaluation JSON files"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def _run_compare_runs(args: argparse.Namespace) -> int:
    from pyro_vae.protocol import compare_runs

    rows = compare_runs(args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| run | ELBO | NLL ± MC se | paired ELBO diff | paired NLL diff |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [row["run"], _number(row["elbo"]), _number(row["nll"], row["nll_se"])]
        cells += [_number(row.get(f"{key}_diff"), row.get(f"{key}_diff_se"), sign=True) for key in ("elbo", "nll")]
        print("| " + " | ".join(cells) + " |")
    return 0


def _number(value: float | None, se: float | None = None, sign: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


# -- score -------------------------------------------------------------------------------------------------
def _score_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument(
        "--data",
        required=True,
        metavar="NAME",
        help='the other data set, e.g. fashion-mnist or "synthetic(data_seed=1)"',
    )
    parser.add_argument(
        "--score",
        dest="scores",
        action="append",
        metavar="SPEC",
        help='a score spec, repeatable or comma-separated, e.g. --score "log_px(samples=1000)" '
        "(default: log_px, elbo, input_complexity; also likelihood_regret)",
    )
    parser.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="split of both sets (default: test)"
    )
    parser.add_argument("--num", type=_positive, metavar="N", help="score N evenly spaced examples of each set")
    parser.add_argument(
        "--samples",
        type=_positive,
        metavar="K",
        help="importance samples of the scores that take samples= (default: their own, 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for the draws (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.add_argument("--out", type=Path, metavar="FIG.png", help="also draw each score's histograms, in and out")


def _run_score(args: argparse.Namespace) -> int:
    from pyro_vae.ood import DEFAULT_SCORES, score_run, score_table
    from pyro_vae.specs import split_specs

    scores = [spec for text in args.scores for spec in split_specs(text)] if args.scores else list(DEFAULT_SCORES)
    if not scores:
        raise _UsageError("--score is empty; e.g. --score log_px")
    detection = score_run(
        args.run,
        args.data,
        scores,
        split=args.split,
        num=args.num,
        samples=args.samples,
        device=args.device,
        data_dir=args.data_dir,
        seed=args.seed,
    )
    report = detection.report
    if args.out is not None:
        from pyro_vae.plots import score_histograms

        sets = "   ".join(f"{side}: {report[side]['data']} {report[side]['split']}" for side in ("in", "out"))
        titles = {spec: f"{spec}: AUROC {numbers['auroc']:.3f}" for spec, numbers in report["scores"].items()}
        panels = {spec: (detection.scores_in[spec], detection.scores_out[spec]) for spec in report["scores"]}
        report["figure"] = str(score_histograms(panels, args.out, titles=titles, caption=sets))
    print(json.dumps(report, indent=2) if args.json else score_table(report))
    return 0


# -- embed -------------------------------------------------------------------------------------------------
def _embed_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="where to write the codes")
    parser.add_argument(
        "--split",
        dest="splits",
        action="append",
        choices=("train", "val", "test"),
        help="a split to encode, repeatable (default: train and test)",
    )
    parser.add_argument("--probe", action="store_true", help="train probes on the codes and print test accuracies")
    parser.add_argument(
        "--probes", default="knn,logistic", metavar="SPECS", help='probe specs (default: "knn,logistic"; knn(k=5))'
    )
    parser.add_argument(
        "--labels",
        default="100,1000,all",
        metavar="COUNTS",
        help="training labels per probe fit, balanced over classes (default: 100,1000,all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the labelled subsets and of a flow guide's draws (default: 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the probes' records (or the arrays' shapes) as JSON")


def _label_counts(text: str) -> list[int | None]:
    counts: list[int | None] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word == "all":
            counts.append(None)
        elif word.isdigit() and int(word) > 0:
            counts.append(int(word))
        else:
            raise _UsageError(
                f"--labels takes positive counts or 'all', comma-separated, e.g. 100,1000,all; got {word!r}"
            )
    if not counts:
        raise _UsageError("--labels is empty; e.g. --labels 100,1000,all")
    return counts


def _run_embed(args: argparse.Namespace) -> int:
    from pyro_vae.embed import DEFAULT_SPLITS, embed_run
    from pyro_vae.specs import split_specs

    splits = args.splits or list(DEFAULT_SPLITS)
    if args.probe:
        probes, counts = split_specs(args.probes), _label_counts(args.labels)
        if not {"train", "test"} <= set(splits):
            raise _UsageError("--probe trains on the train codes and tests on the test codes: keep both splits")
        from pyro_vae.probe import PROBES

        for spec in probes:
            PROBES.check(spec)  # a bad probe is refused before anything is encoded
    arrays = embed_run(args.run, args.out, splits, device=args.device, data_dir=args.data_dir, seed=args.seed)
    if args.probe:
        from pyro_vae.probe import probe_codes, probe_table

        records = probe_codes(arrays, probes, counts, seed=args.seed)
        print(json.dumps({"codes": str(args.out), "probes": records}, indent=2) if args.json else probe_table(records))
        return 0
    shapes = {key: list(value.shape) if value.ndim else str(value) for key, value in arrays.items()}
    print(json.dumps({"codes": str(args.out), "arrays": shapes}, indent=2) if args.json else str(args.out))
    return 0


# -- impute -------------------------------------------------------------------------------------------------
def _impute_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument(
        "--missing",
        metavar="SPEC",
        help="which pixels are missing: mcar(rate=R) or squares(size=S) (default: the run's data.missing)",
    )
    parser.add_argument(
        "--samples", type=_positive, default=1000, metavar="K", help="importance samples per example (default: 1000)"
    )
    parser.add_argument("--num", type=_positive, default=None, metavar="N", help="impute N evenly spaced examples only")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="(default: test)")
    parser.add_argument(
        "--draws", type=_positive_or_zero, default=3, metavar="S", help="multiple imputations drawn (default: 3)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for the draws (default: 0)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="where to write the figure")
    parser.add_argument("--json", action="store_true", help="print the errors as JSON")
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show a bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never a bar")


def _run_impute(args: argparse.Namespace) -> int:
    from pyro_vae.impute import impute_run

    result = impute_run(
        args.run,
        out=args.out,
        missing=args.missing,
        num_samples=args.samples,
        num=args.num,
        split=args.split,
        draws=args.draws,
        device=args.device,
        data_dir=args.data_dir,
        seed=args.seed,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"missing {result['missing']}; {result['num_examples']} examples, K = {result['samples']}")
    print(f"{'error':>10}  {'model':>20}  {'mean imputation':>20}")
    for name in result["model"]:
        if not name.endswith("_se"):
            cells = [_with_se(result[who], name) for who in ("model", "mean_imputation")]
            print(f"{name:>10}  {cells[0]:>20}  {cells[1]:>20}")
    print(result["figure"])
    return 0


def _with_se(summary: dict[str, Any], name: str) -> str:
    value, se = summary[name], summary[f"{name}_se"]
    if value is None:
        return "none"
    return f"{value:.4f} +- {se:.4f}" if se is not None else f"{value:.4f}"


# -- gaps ---------------------------------------------------------------------------------------------------
def _gaps_args(parser: argparse.ArgumentParser) -> None:
    _run_dir_args(parser)
    parser.add_argument("--num", type=_positive, default=100, metavar="N", help="N evenly spaced examples (100)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default: test)")
    parser.add_argument(
        "--nll",
        default=None,
        metavar="SPEC",
        help='the log p(x) estimator (default: "ais(steps=1000, leapfrog=10, chains=16)"; or "is(samples=K)")',
    )
    parser.add_argument("--steps", type=_positive_or_zero, default=None, metavar="S", help="local-fit Adam steps (500)")
    parser.add_argument("--lr", type=float, default=0.05, metavar="LR", help="local-fit initial rate (default: 0.05)")
    parser.add_argument(
        "--particles", type=_positive, default=1000, metavar="P", help="draws per ELBO estimate (default: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for the draws (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")


def _run_gaps(args: argparse.Namespace) -> int:
    from pyro_vae.gaps import DEFAULT_NLL, DEFAULT_STEPS, gaps_run
    from pyro_vae.local_fit import LocalFit

    fit = LocalFit(steps=DEFAULT_STEPS if args.steps is None else args.steps, lr=args.lr, particles=args.particles)
    result = gaps_run(
        args.run,
        num=args.num,
        split=args.split,
        nll=args.nll or DEFAULT_NLL,
        fit=fit,
        device=args.device,
        data_dir=args.data_dir,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['num_examples']} {args.split} examples of {args.run}, guide {result['guide']}, {result['nll_method']}"
    )
    rows = (("log p(x)", "log_px"), ("L[q*]", "local"), ("L[q_phi]", "amortized"))
    rows += (
        ("approximation gap", "approximation"),
        ("amortization gap", "amortization"),
        ("inference gap", "inference"),
    )
    for label, key in rows:
        print(f"{label:>18}  {result[key]:9.3f} ± {result[key + '_se']:.3f}")
    if result.get("warning"):
        print(f"warning: {result['warning']}")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand(
        "train a VAE and write a run folder",
        "Train the VAE a TOML config describes. The run folder gets config.toml, metrics.jsonl, "
        "checkpoint.pt (every epoch), best.pt, train.log, evaluation.json and figures.\n\n"
        "examples:\n"
        "  pyro-vae train --config configs/mnist.toml\n"
        "  pyro-vae train --config configs/mnist.toml --set train.epochs=2 --set data.subset=1000 --out runs/quick\n"
        "  pyro-vae train --resume --out runs/quick --set train.epochs=4",
        _train_args,
        _run_train,
    ),
    "evaluate": Subcommand(
        "test ELBO, importance-sampled or AIS NLL, bits/dim of a run; BDMC bounds",
        "Evaluate a run's best weights on its test set: ELBO, NLL (K importance samples, or annealed importance "
        "sampling) and its standard error, bits/dim, active units. With --bdmc N: forward and reverse AIS on N "
        "examples simulated from the model, a lower and an upper bound on log p(x) and their gap.\n\nexamples:\n"
        "  pyro-vae evaluate --run runs/quick --json\n"
        '  pyro-vae evaluate --run runs/quick --nll "ais(steps=1000, leapfrog=10, chains=16)" --subset 1000\n'
        '  pyro-vae evaluate --run runs/quick --bdmc 100 --nll "ais(steps=1000)"',
        _evaluate_args,
        _run_evaluate,
    ),
    "sample": Subcommand(
        "draw images from a run's prior",
        "Decode N draws z ~ p(z) of a run's model into an image grid.\n\n"
        "example:\n  pyro-vae sample --run runs/quick --num 64 --out samples.png",
        _sample_args,
        _run_sample,
    ),
    "plot": Subcommand(
        "write a run's figures again",
        "Learning curves, reconstructions, samples, latent codes, interpolations, as PNG in the run "
        "folder.\n\nexample:\n  pyro-vae plot --run runs/quick",
        _plot_args,
        _run_plot,
    ),
    "compare": Subcommand(
        "compare bound and gradient estimators on a run's model",
        "Bound mean and standard error, variance, gradient signal-to-noise and time per evaluation "
        'for each estimator.\n\nexamples:\n  pyro-vae compare --run runs/quick --estimators "trace,iwae(k=50)"\n'
        "  # gradient SNR against k per datapoint (Rainforth et al. 2018):\n"
        '  pyro-vae compare --run runs/quick --per-example --batch 10 --estimators "iwae(k=1),iwae(k=10),iwae(k=100)"',
        _compare_args,
        _run_compare,
    ),
    "compare-runs": Subcommand(
        "paired comparison of evaluated runs",
        "The test ELBO and NLL of each run and, for each after the first, its per-example paired difference to "
        "the first with its standard error (from evaluation.npz). Refuses, naming the difference, runs whose "
        "evaluation protocols differ (data, examples, estimator settings).\n\n"
        "example:\n  pyro-vae compare-runs runs/vae runs/iwae5",
        _compare_runs_args,
        _run_compare_runs,
    ),
    "score": Subcommand(
        "out-of-distribution scores of another data set against a run's own: AUROC, AUPRC",
        "Score the run's split (in-distribution) and the same split of another data set (out-of-distribution, "
        "the positives) by each score (higher = more anomalous), and say how well each separates them: "
        "AUROC with its SE, AUPRC, the mean score of each set. Docs: docs/applications.md.\n\n"
        "examples:\n"
        "  pyro-vae score --run runs/mnist --data fashion-mnist\n"
        '  pyro-vae score --run runs/mnist --data fashion-mnist --score "log_px(samples=1000),likelihood_regret" '
        "--num 1000 --json --out ood.png",
        _score_args,
        _run_score,
    ),
    "embed": Subcommand(
        "latent codes of a run's splits as features (.npz), and probes trained on them",
        "Write the posterior means and scales of the run's train and test sets, with their labels, to an "
        ".npz (keys train_loc, train_scale, train_labels, test_loc, ...; docs/applications.md). With --probe, "
        "train a k-NN and a logistic-regression probe on the codes of 100, 1000 and all training labels and "
        "print their test accuracies with binomial SEs.\n\n"
        "examples:\n"
        "  pyro-vae embed --run runs/mnist --out codes.npz\n"
        '  pyro-vae embed --run runs/mnist --out codes.npz --probe --probes "knn(k=10),logistic" --json',
        _embed_args,
        _run_embed,
    ),
    "gaps": Subcommand(
        "the inference gap of a run's guide and its approximation and amortization parts",
        "On N evenly spaced examples of a split: log p(x) (AIS by default), the ELBO of the amortized guide L[q_phi] "
        "and of the family's best local fit L[q*] (q's parameters optimized for each example), and the gaps "
        "log p - L[q*] (approximation) and L[q*] - L[q_phi] (amortization) of Cremer et al. 2018, with SEs. "
        "Docs: docs/evaluation.md.\n\n"
        "examples:\n"
        "  pyro-vae gaps --run runs/static --num 100\n"
        '  pyro-vae gaps --run runs/static --num 20 --nll "is(samples=5000)" --steps 200 --json',
        _gaps_args,
        _run_gaps,
    ),
    "impute": Subcommand(
        "impute the missing pixels of a run's images",
        "Single (self-normalised importance sampling) and multiple (sampling-importance-resampling) "
        "imputations of the missing pixels of a run's test images, their error beside mean imputation, "
        "and a figure (docs/missing.md). The pixels are missing as the run's data.missing says, or as --missing.\n\n"
        "examples:\n"
        "  pyro-vae impute --run runs/miwae --out imputations.png --json\n"
        "  pyro-vae impute --run runs/quick --missing 'squares(size=14)' --samples 5000 --out squares.png",
        _impute_args,
        _run_impute,
    ),
}


# -- argument types and errors -----------------------------------------------------------------------------
class _UsageError(ValueError):
    """A command line that cannot work (e.g. --resume without --out)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` argument parser, one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="pyro-vae", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from pyro_vae import __version__

    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        child = sub.add_parser(
            name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(child)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a mistake in the input (config, spec, data, run folder), not a bug."""
    from pyro_vae.train import TrainingError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, TrainingError)


def _one_line(text: str) -> str:
    """One line whatever the input: a --set value or a path may itself hold a newline."""
    return " ".join(text.splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-vae`` and ``python -m pyro_vae``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = SUBCOMMANDS[args.command]
    with warnings.catch_warnings():  # restores Python's own warning printer when the command returns

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            print(f"pyro-vae {args.command}: warning: {_one_line(str(message))}", file=sys.stderr)

        warnings.showwarning = show  # a warning is a line for the user, not a source location
        try:
            return command.run(args)
        except _user_errors() as err:
            if os.environ.get("PYRO_VAE_DEBUG"):
                raise
            print(f"pyro-vae {args.command}: error: {_one_line(str(err) or type(err).__name__)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"pyro-vae {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
