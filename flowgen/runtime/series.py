"""The one recorder of per-step series, shared by ``run``, ``validate``, ``explain`` and ``sweep``.

Every command records scalars on one time axis, ``step = 0, 1, …, N``: the value
of a process *after* ``step`` discrete steps (one unit of flow time = one step).
A series is a float64 array of length ``N + 1``, NaN where nothing was recorded
(before a flow starts, between sharpness measurements). JSON outputs write NaN
and ±inf as ``null``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["Series", "json_values"]


def json_values(values) -> list[float | None]:
    """A float array as a JSON list, non-finite entries as ``None``."""
    return [float(x) if np.isfinite(x) else None for x in np.asarray(values, dtype=float)]


class Series:
    """Named float64 series over the steps ``0..N`` (the ``step`` series is built in).

    >>> s = Series(3)
    >>> s.put("loss", [1, 2], [0.5, 0.25])
    >>> s["loss"]
    array([ nan, 0.5 , 0.25,  nan])
    """

    def __init__(self, steps: int, names: Iterable[str] = ()):
        self.steps = int(steps)
        self._data: dict[str, np.ndarray] = {"step": np.arange(self.steps + 1, dtype=float)}
        for name in names:
            self.ensure(name)

    def ensure(self, name: str) -> np.ndarray:
        """The series ``name``, created NaN-filled if it does not exist yet."""
        if name not in self._data:
            self._data[name] = np.full(self.steps + 1, np.nan)
        return self._data[name]

    def put(self, name: str, steps, values) -> None:
        """Record ``values`` at ``steps`` (arrays of equal length, or scalars)."""
        self.ensure(name)[np.asarray(steps, dtype=int)] = np.asarray(values, dtype=float)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[name] if name in self._data else np.full(self.steps + 1, np.nan)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def names(self) -> list[str]:
        return list(self._data)

    def arrays(self) -> dict[str, np.ndarray]:
        """All series (the dict itself: callers must not modify it)."""
        return self._data

    def to_json(self) -> dict[str, list[float | None]]:
        return {k: json_values(v) for k, v in self._data.items()}

    # ---------------------------------------------------------------- checkpoints

    def snapshot(self, prefix: str = "series/") -> dict[str, np.ndarray]:
        return {prefix + k: v.copy() for k, v in self._data.items()}

    @classmethod
    def restore(cls, steps: int, arrays: dict[str, np.ndarray], prefix: str = "series/"):
        out = cls(steps)
        for key, value in arrays.items():
            if key.startswith(prefix):
                value = np.asarray(value, dtype=float)
                if value.shape != (out.steps + 1,):
                    raise ValueError(f"series {key} has shape {value.shape}")
                out._data[key[len(prefix) :]] = value.copy()
        return out
