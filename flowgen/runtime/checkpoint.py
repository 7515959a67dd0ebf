"""Checkpoints: everything a long run needs to continue, written atomically every chunk.

A checkpoint is one file, ``DIR/checkpoint.npz``: the processes' snapshots
(iterates, optimizer states, flow states such as Σ's basis and the eigensolver's
warm start, PRNG keys), the series recorded so far, and a JSON header (stored in
the same file, so the two can never disagree) with

* ``identity`` — what the run *is*: the command, the `.opt` source's sha256, the
  hyperparameters, the problem and its options, the configuration. Resuming with
  any of these different is refused (:class:`~flowgen.errors.UsageError`, exit 2);
* ``state`` — where it is: the time reached, the start step of the flows, etc.

The file is written to a temporary name, flushed to disk and renamed over the
previous checkpoint (``os.replace`` is atomic), so a kill at any moment leaves
either the previous complete checkpoint or the new one: a SIGKILL loses at most
the chunk in progress. Nothing is pickled: arrays and JSON only.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from flowgen.errors import UsageError

__all__ = ["CheckpointStore", "CHECKPOINT_NAME", "FORMAT", "run_identity"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = 1  # bumped when the layout changes
_HEADER = "__header__"


def _jsonable(x):
    """Normalise a JSON-able structure (tuples → lists, numpy scalars → Python)."""
    return json.loads(json.dumps(x, default=_default))


def _default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _differences(saved, current, path="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _differences(saved.get(k), current.get(k), f"{path}.{k}" if path else k)
        return out
    if saved != current:
        return [f"{path}: checkpoint has {saved!r}, this run has {current!r}"]
    return []


class CheckpointStore:
    """The checkpoint of one run in directory ``directory``.

    Args:
      directory: the run's ``--out`` directory.
      identity: JSON-able description of the run; a resume must match it exactly.
    """

    def __init__(self, directory: str | Path, identity: dict):
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_NAME
        self.identity = _jsonable(identity)
        self.saves = 0

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Write the checkpoint atomically (temporary file, fsync, rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "identity": self.identity, "state": _jsonable(state)}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{_HEADER: np.array(json.dumps(header))}, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.saves += 1

    def load(self) -> tuple[dict, dict[str, np.ndarray]]:
        """``(state, arrays)`` of the checkpoint, after checking it belongs to this run.

        Raises :class:`UsageError` when there is none, when it is corrupt or
        partial, or when it was written by a different run.
        """
        how = "run without --resume to start afresh, or give the right --out"
        if not self.path.exists():
            raise UsageError(f"--resume: no checkpoint in {self.directory}", hint=how)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = json.loads(str(arrays.pop(_HEADER)))
            identity, state = header["identity"], header["state"]
            fmt = header["format"]
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            raise UsageError(
                f"--resume: the checkpoint {self.path} is corrupt or partial "
                f"({type(err).__name__})",
                hint="delete it and run without --resume",
            ) from None
        if fmt != FORMAT:
            raise UsageError(
                f"--resume: the checkpoint {self.path} has format {fmt}, this flowgen writes "
                f"{FORMAT}",
                hint="rerun without --resume",
            )
        diff = _differences(identity, self.identity)
        if diff:
            shown = "; ".join(diff[:4]) + ("; …" if len(diff) > 4 else "")
            raise UsageError(
                f"--resume: the checkpoint in {self.directory} belongs to a different run "
                f"({shown})",
                hint="resume with the same file, hyperparameters, problem and options, or use "
                "another --out",
            )
        return state, arrays


def run_identity(command: str, opt, problem, config) -> dict:
    """What a run *is*, for :class:`CheckpointStore`: the command, the `.opt` source's
    sha256, the hyperparameters, the problem (name, options, parameter count) and the
    configuration (a dataclass or dict)."""
    from dataclasses import asdict, is_dataclass

    info = getattr(problem, "info", {}) or {}
    return {
        "command": command,
        "optimizer": opt.name,
        "sha256": opt.spec.sha256,
        "hyper": {k: float(v) for k, v in opt.hyper.items()},
        "problem": {
            "name": problem.name,
            "spec": info.get("spec", problem.name),
            "options": info.get("options", {}),
            "n_params": int(problem.n),
        },
        "config": asdict(config) if is_dataclass(config) else dict(config),
    }
