"""The runtime's caches of compiled code, bounded, and one call that empties them.

Every process keeps its jitted functions in a small cache keyed by the optimizer
and the problem, so that a flow restored from a checkpoint, or a second flow of
the same problem, does not compile again. Each cache holds the problem's loss
(and through it its data) and XLA's executables, so a long-lived Python process
that works through many problems (a sweep, a notebook, a test session) should
call :func:`clear_caches` between them; nothing is lost but compile time.
"""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

#: entries per cache: a process rarely alternates between more problems than this
CACHE_SIZE = 4

_CLEARERS: list[Callable[[], None]] = []  # module-level caches (functools.lru_cache)
_CACHES: weakref.WeakSet = weakref.WeakSet()  # every live OwnedCache (none kept alive)


def register(clear: Callable[[], None]) -> Callable[[], None]:
    """Record ``clear`` (empties a module-level cache) for :func:`clear_caches`."""
    _CLEARERS.append(clear)
    return clear


class OwnedCache:
    """An LRU map ``key -> value`` whose entries also hold the objects whose ``id``
    is part of the key (so an id is never reused while its entry lives)."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        _CACHES.add(self)  # weakly: a cache that is dropped leaves the registry with it

    def clear(self) -> None:
        self._d.clear()

    def get(self, key: Hashable, owners: tuple):
        hit = self._d.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], owners, strict=True)):
            self._d.move_to_end(key)
            return hit[1]
        return None

    def put(self, key: Hashable, owners: tuple, value):
        self._d[key] = (owners, value)
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._d)


def clear_caches() -> None:
    """Empty every flowgen cache of compiled code, then JAX's own (``jax.clear_caches``)."""
    import jax

    for clear in _CLEARERS:
        clear()
    for cache in list(_CACHES):
        cache.clear()
    jax.clear_caches()
    gc.collect()
