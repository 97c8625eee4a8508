"""Training checkpoints: written atomically, loaded without ever running code.

A checkpoint is a plain dictionary of tensors and plain Python values (no pickled objects):

- ``model``, ``optimizer``: ``state_dict()`` of the VAE and of the torch optimizer (the
  learning-rate schedule is a function of the epoch and has no state);
- ``x_dim``, ``image_shape``: the data the model was built for (so a run can be sampled without its data);
- ``param_store``: Pyro's param store as ``{name: unconstrained tensor}`` plus
  ``param_constraints`` ``{name: constraint name}`` (the store's own state holds constraint
  objects, which only a full unpickler could rebuild);
- ``config``: the resolved configuration as a plain dict;
- ``epoch`` (completed epochs), ``step`` (completed optimizer steps), ``best_val_bound`` (the
  selection metric, ``val_bound``), ``best_val_elbo``, ``best_epoch``, ``bad_epochs`` (early-stopping counter);
- ``rng``: the torch CPU (and CUDA) generator states, Python's ``random`` state and numpy's,
  all as tensors and plain values; ``data_generator``: the state of the generator that draws
  the dataset permutation (and dynamic binarization).

Writing goes to a temporary file in the same folder, is flushed to disk (``fsync``) and then
renamed over the old file (``os.replace`` is atomic on POSIX and Windows), so a crash or a
Ctrl-C while writing leaves the previous checkpoint intact. Reading uses
``torch.load(weights_only=True)``: a file that contains a pickled object (which could run
arbitrary code when unpickled) is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyro
import torch
from torch.distributions import constraints

FORMAT = "pyro_vae.checkpoint"
VERSION = 1

# Constraint objects are not plain data; store them by the name they have in
# torch.distributions.constraints (only parameter-free constraints can be restored this way).
_CONSTRAINTS = {name: obj for name, obj in vars(constraints).items() if isinstance(obj, constraints.Constraint)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, unsafe (pickled objects) or foreign."""


# -- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every global random state Pyro draws from, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss_next},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached": float(np_cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))


# -- Pyro param store --------------------------------------------------------------------------
def param_store_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The param store as ``({name: unconstrained tensor}, {name: constraint name})``."""
    store = pyro.get_param_store()
    state = store.get_state()
    params = {name: value.detach().clone() for name, value in state["params"].items()}
    names = {}
    for name, constraint in state["constraints"].items():
        found = next((key for key, obj in _CONSTRAINTS.items() if obj is constraint), None)
        if found is None and isinstance(constraint, type(constraints.real)):
            found = "real"
        if found is None:
            raise CheckpointError(
                f"param {name!r} has constraint {constraint!r}, which a checkpoint cannot store "
                f"(storable: {', '.join(sorted(_CONSTRAINTS))})"
            )
        names[name] = found
    return params, names


def restore_param_store(params: dict[str, torch.Tensor], names: dict[str, str], skip_modules: bool = True) -> None:
    """Put saved params back into Pyro's param store.

    Parameters of modules registered with ``pyro.module`` (names containing ``$$$``) are skipped
    by default: the module's ``state_dict`` is their source of truth, and ``pyro.module``
    registers the live tensors again at the next model call (the store must not hold copies
    that the optimizer does not update).
    """
    kept = [name for name in params if not (skip_modules and "$$$" in name)]
    pyro.get_param_store().set_state(
        {
            "params": {name: params[name].detach().clone().requires_grad_() for name in kept},
            "constraints": {name: _CONSTRAINTS[names.get(name, "real")] for name in kept},
        }
    )


# -- files -----------------------------------------------------------------------------------------
def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`atomic_write`).

    A Ctrl-C inside ``torch.save`` surfaces from its zip writer as a ``RuntimeError`` (the writer's
    cleanup fails on the half-written file); it is raised again as the ``KeyboardInterrupt`` it was,
    so the caller reports an interruption, not a crash.
    """
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda handle: torch.save(state, handle))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """``write(handle)`` into a temp file in ``path``'s folder, fsync, rename over ``path``.

    Anything that stops the write (a full disk, a Ctrl-C) removes the temp file and leaves ``path``
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, KeyboardInterrupt) and _interrupted(err):
            raise KeyboardInterrupt from None
        raise
    _fsync_dir(path.parent)
    return path


def _interrupted(err: BaseException) -> bool:
    """Whether a ``KeyboardInterrupt`` is among the exceptions ``err`` was raised while handling."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Let what runs inside finish before a Ctrl-C takes effect; a second Ctrl-C stops it at once.

    A run's epoch is committed by writing its checkpoint files: deferring the first SIGINT until they
    are written makes an interruption land between two epochs, never inside a save. Only the main
    thread can handle signals; elsewhere (and under a non-default handler) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if pending:  # the second Ctrl-C: the user will not wait for the save
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform can open a folder, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# What reading a run's weights needs (runs.load_run), and what resuming it needs besides.
WEIGHTS_ENTRIES = ("model", "config", "x_dim", "epoch")
RESUME_ENTRIES = (
    *WEIGHTS_ENTRIES,
    *("optimizer", "param_store", "param_constraints", "step", "best_val_elbo", "best_epoch", "bad_epochs"),
    *("rng", "data_generator"),
)
_MISMATCH = ("size mismatch", "Missing key", "Unexpected key")
_DAMAGED = "the file is damaged or was not written by pyro-vae train"


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", required: Sequence[str] = ()
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; refuse anything that is not plain data.

    ``required``: entries the caller needs (:data:`WEIGHTS_ENTRIES`, :data:`RESUME_ENTRIES`); a
    missing one is a :class:`CheckpointError` naming it, not a ``KeyError`` later.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is truncated or foreign
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint (truncated or corrupt?)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(str(err))}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pyro_vae checkpoint (no format tag {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this code reads {VERSION}")
    missing = [entry for entry in required if entry not in state]
    if missing:
        names = ", ".join(repr(entry) for entry in missing)
        raise CheckpointError(
            f"checkpoint {path} has no {names} entry: {_DAMAGED}; use the run's other checkpoint "
            f"(best.pt or checkpoint.pt) or train the run again"
        )
    return state


def _unpickling_error(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """torch's refusal of a pickled object said in the project's words (torch's own advice is to
    turn the safety off, which is exactly what must not be done with a file of unknown origin)."""
    text = str(err)
    name = re.search(r"GLOBAL (\S+)", text)
    if name or "Weights only load failed" in text:
        what = name.group(1) if name else "something other than tensors and plain values"
        return CheckpointError(
            f"refusing to load {path}: it contains a pickled object ({what}), and unpickling it could run "
            "code; a pyro_vae checkpoint holds only tensors and plain values, so this file is not one"
        )
    return CheckpointError(f"cannot read checkpoint {path}: {_first_line(text)}")


def _first_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of an error message, shortened: torch's run to paragraphs."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), text.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_weights(module: torch.nn.Module | torch.optim.Optimizer, state: dict[str, Any], entry: str, path) -> None:
    """``module.load_state_dict(state[entry])``, a mismatch said as one line naming the file and entry.

    A mismatch means the checkpoint's tensors do not fit the model its own config describes (or the
    optimizer the run's config builds): the file was edited, damaged, or pieced together from two runs.
    """
    try:
        module.load_state_dict(state[entry])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        # torch lists every mismatch on its own line after a heading; the first one says enough
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if line.startswith(_MISMATCH)), lines[0])
        raise CheckpointError(
            f"the {entry!r} entry of {path} does not fit the {type(module).__name__} its config describes "
            f"({_first_line(detail)}): the file's tensors and config disagree; use the run's other "
            f"checkpoint (best.pt or checkpoint.pt) or train the run again"
        ) from None
