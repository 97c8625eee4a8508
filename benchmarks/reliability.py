"""The numbers of docs/results/reliability.md: bad inputs fuzzed, kill -9 resumes, divergences,
concurrent writers, damaged data files, each counted by outcome.

    python -m benchmarks.reliability [--fuzz 2000] [--kills 8] [--pairs 4]

- fuzz: the hypothesis strategy of tests/test_bad_input.py (``override``: config keys, spec strings,
  values), a fixed seed, N examples. Each override is loaded (``checks.load_config``) and, when
  accepted, built as a run would build it (model at x_dim 64, optimizer, schedule, estimator,
  device). Outcomes: a clean error (a project error, one line), accepted, a traceback (any other
  exception), a hang (over 10 s). "Silent" (accepted but wrong) cannot be seen from outside; the
  audit's silent cases are regression tests in tests/test_bad_input.py.
- kill -9: a tiny run in a subprocess is killed with SIGKILL at a random moment of its training
  (checkpoint writes included), resumed to the end, and compared bit for bit (every tensor of the
  final checkpoint, every metric but the wall-clock seconds) with an uninterrupted run.
- divergence: the audit's commands (SGD at lr 1e20, Adam at lr 1e6) resumed from a good epoch; the
  folder's checkpoint.pt, best.pt and metrics.jsonl must be byte-identical afterwards.
- concurrent writers: two ``pyro-vae train`` (then two ``--resume``) started together on one folder.
- data files: every damaged file of tests/test_bad_data_files.py, through ``load_dataset`` and the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import machine_info

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fuzzer's strategy and the damaged files are the tests'

TINY = """[model]
z_dim = 2
hidden_dims = [8]
[data]
name = "synthetic(num_train=200, num_test=60, side=4, components=3)"
[train]
epochs = {epochs}
batch_size = 40
lr = 0.01
optimizer = "{optimizer}"
nll_samples = 0
plots = false
device = "cpu"
"""


# -- fuzz ---------------------------------------------------------------------------------------------------
class _HangError(Exception):
    pass


def _build(cfg) -> None:
    """What a run builds from its config, short of loading data: device, model, optimizer, schedule, estimator."""
    from pyro_vae import data, estimators, optim
    from pyro_vae.runs import build_vae

    data.resolve_device(cfg.train.device)
    vae = build_vae(cfg.model, x_dim=64, x_shape=(1, 8, 8))
    optim.build_optimizer(cfg.train.optimizer, vae.parameters(), lr=cfg.train.lr)
    optim.build_schedule(cfg.train.lr_schedule, epochs=cfg.train.epochs)
    estimators.get(cfg.train.estimator)


def _on_alarm(signum, frame):
    raise _HangError


def classify(item: str) -> tuple[str, str]:
    """``(outcome, detail)`` of one fuzzed override; over 10 seconds is a hang."""
    from pyro_vae import checks, cli

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(10)
    try:
        _build(checks.load_config(None, [item]))
        return "accepted", ""
    except cli._user_errors() as err:
        one_line = "\n" not in str(err)
        return ("clean error" if one_line else "multi-line error"), f"{type(err).__name__}: {err}"[:200]
    except _HangError:
        return "hang", ""
    except Exception as err:  # counting them is the point
        return "traceback", f"{type(err).__name__}: {err}"[:200]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(examples: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from test_bad_input import override

    # An unbounded size that slipped past the estimate fails to allocate here instead of swapping the machine.
    vm = int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 2**30, resource.RLIM_INFINITY))
    counts, examples_of = Counter(), {}

    @settings(
        max_examples=examples, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(override())
    def run(item):
        outcome, detail = classify(item)
        counts[outcome] += 1
        if outcome not in ("accepted", "clean error"):
            examples_of.setdefault(outcome, []).append({"override": item[:200], "error": detail})

    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # warnings of accepted configs (VampPrior warm-up, ...)
        run()
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return {
        "cases": sum(counts.values()),
        **counts,
        "seconds": round(time.perf_counter() - start, 1),
        "examples": examples_of,
    }


# -- subprocess runs ------------------------------------------------------------------------------------------
def _train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "train", "--no-progress", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _config(folder: Path, epochs: int, optimizer: str = "adam") -> Path:
    path = folder / f"tiny-{epochs}-{optimizer}.toml"
    path.write_text(TINY.format(epochs=epochs, optimizer=optimizer))
    return path


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN placeholders compare equal


def _metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _same_run(a: Path, b: Path) -> bool:
    from pyro_vae.checkpoint import load_checkpoint

    sa, sb = (load_checkpoint(p / "checkpoint.pt") for p in (a, b))
    return _tensors_equal(sa, sb) and _metrics(a) == _metrics(b)


def kills(tries: int, folder: Path, seed: int = 0) -> dict:
    """kill -9 at a random moment of the training of a 40-epoch tiny run, then resume it."""
    config, rng = _config(folder, epochs=40), random.Random(seed)
    reference = folder / "reference"
    start = time.perf_counter()
    proc = _train("--config", str(config), "--out", str(reference))
    while not (reference / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.005)
    training_started = time.perf_counter()
    proc.wait()
    training = time.perf_counter() - training_started
    outcome = Counter()
    for i in range(tries):
        run = folder / f"killed-{i}"
        proc = _train("--config", str(config), "--out", str(run))
        while not (run / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, training))
        if proc.poll() is not None:
            outcome["finished before the kill"] += 1
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = _train("--resume", "--out", str(run))
        _, err = resumed.communicate()
        exact = resumed.returncode == 0 and _same_run(reference, run)
        outcome["exact" if exact else "not exact"] += 1
        if not exact:
            outcome[f"try {i}: {err.strip().splitlines()[-1:]}"] += 1
    return {
        "tried": sum(v for k, v in outcome.items() if k in ("exact", "not exact")),
        **outcome,
        "training_seconds": round(training, 2),
        "setup_seconds": round(training_started - start, 2),
    }


def concurrent(pairs: int, folder: Path) -> dict:
    """Two writers started together on one folder: new runs, then resumes; one of each pair must be refused."""
    outcome = Counter()
    for i in range(pairs):
        run = folder / f"pair-{i}"
        for kind, config in (("new", _config(folder, 30)), ("resume", None)):
            args = ["--config", str(config)] if config else ["--resume", "--set", "train.epochs=60"]
            procs = [_train(*args, "--out", str(run)) for _ in range(2)]
            results = [(p.wait(), p.stderr.read()) for p in procs]
            codes = sorted(code for code, _ in results)
            locked = any("being written by another training process (PID" in err for _, err in results)
            epochs = [r["epoch"] for r in _metrics(run)]
            clean = codes == [0, 2] and epochs == list(range(1, len(epochs) + 1))
            outcome[f"{kind}: refused"] += clean
            outcome[f"{kind}: refused by the lock (PID named)"] += clean and locked
            outcome[f"{kind}: tried"] += 1
    return dict(outcome)


def divergence(folder: Path) -> dict:
    """The audit's divergences, resumed from a good first epoch: is the folder byte-identical after?"""
    from pyro_vae import cli

    cases = {
        "sgd lr=1e20": ("sgd", ["train.lr=1e20", "train.batch_size=200"]),
        "adam lr=1e6": ("adam", ["train.lr=1e6"]),
        "sgd lr=1e30 (NaN loss)": ("sgd", ["train.lr=1e30"]),
    }
    outcome = {}
    for name, (optimizer, sets) in cases.items():
        run = folder / f"diverge-{optimizer}-{len(outcome)}"
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            cli.main(["train", "--config", str(_config(folder, 1, optimizer)), "--out", str(run), "--no-progress"])
        before = {
            p.name: p.read_bytes() for p in run.iterdir() if p.name in ("checkpoint.pt", "best.pt", "metrics.jsonl")
        }
        err = io.StringIO()
        argv = ["train", "--resume", "--out", str(run), "--set", "train.epochs=5", "--no-progress"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main([*argv, *(a for s in sets for a in ("--set", s))])
        after = {name: (run / name).read_bytes() for name in before}
        outcome[name] = {
            "stopped": status == cli.EXIT_FAILED,
            "intact": after == before,
            "message": err.getvalue().strip().splitlines()[-1][:160],
        }
    return {
        "tried": len(outcome),
        "intact": sum(c["stopped"] and c["intact"] for c in outcome.values()),
        "cases": outcome,
    }


def data_files(folder: Path) -> dict:
    """Every damaged file of tests/test_bad_data_files.py through load_dataset and through the CLI."""
    from test_bad_data_files import CASES

    from pyro_vae import cli
    from pyro_vae.data import DataFileError, load_dataset

    outcome = Counter()
    for case, (name, damage, _) in CASES.items():
        root = folder / f"data-{case}"
        path = damage(root)
        try:
            load_dataset(name, root=root, val_size=2)
            outcome["accepted"] += 1
        except DataFileError as err:
            outcome["library: one line naming the file"] += str(err).startswith(f"{path}: ") and "\n" not in str(err)
        except Exception:
            outcome["library: traceback"] += 1
        config = folder / f"{case}.toml"
        config.write_text(f'[data]\nname = "{name}"\n[train]\ndevice = "cpu"\n')
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli.main(["train", "--config", str(config), "--data-dir", str(root), "--out", str(folder / case)])
        text = err.getvalue()
        outcome["cli: exit 2, one line naming the file"] += status == 2 and text.count("\n") == 1 and str(path) in text
        outcome["tried"] += 1
    return dict(outcome)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=2000, help="fuzzed overrides (default 2000)")
    parser.add_argument("--kills", type=int, default=8, help="kill -9 tries (default 8)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of concurrent writers (default 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report = {
            "machine": machine_info(torch.device("cpu")),
            "data_files": data_files(folder),
            "divergence": divergence(folder),
            "concurrent_writers": concurrent(args.pairs, folder),
            "kill_9": kills(args.kills, folder),
            "fuzz": fuzz(args.fuzz),
        }
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
