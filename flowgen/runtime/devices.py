"""Where a run's parameter-sized arrays live: one device, or sharded over several.

When JAX sees several devices (GPUs, TPU cores, or CPU devices made with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``), the parameter vector
is placed with a :class:`jax.sharding.NamedSharding` over a one-axis mesh
(``"params"``), split along its only axis. Everything computed from it inside
``jit`` — optimizer states, the flows' iterates, eigenvectors, Hessian-vector
products — inherits the sharding through XLA's sharding propagation (GSPMD):
flowgen writes no communication by hand. Small data (the SDCP's ``k×k``
matrices, scalars) stays replicated.

A mesh must divide the parameter count: the largest number of devices
``d ≤ len(jax.devices())`` that divides ``n`` is used (``d = 1`` for a prime
``n``), and the devices actually used are recorded in every output's
``provenance.devices``. Nothing here assumes a CPU: the same code shards over
GPUs when JAX sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["Placement", "commit"]

AXIS = "params"


@dataclass(frozen=True)
class Placement:
    """The devices of a run and how an ``(n,)`` vector is laid out on them."""

    devices: tuple  # the jax devices used
    mesh: Mesh | None  # None: a single device

    @classmethod
    def for_size(cls, n: int, devices=None) -> Placement:
        """Shard over the largest number of ``devices`` (default: all) that divides ``n``."""
        devices = list(jax.devices() if devices is None else devices)
        d = max(k for k in range(1, len(devices) + 1) if n % k == 0)
        used = tuple(devices[:d])
        return cls(used, Mesh(np.array(used), (AXIS,)) if d > 1 else None)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def vector(self, x):
        """Place an ``(n,)`` array (or a pytree of them) split along its axis."""
        if self.mesh is None:
            return jax.device_put(x, self.devices[0])
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(AXIS)))

    def like(self, x):
        """Place ``x``: split if its leading axis is the parameter axis, else replicated."""
        if self.mesh is None:
            return jax.device_put(x, self.devices[0])

        def put(a):
            a = jax.numpy.asarray(a)
            n = self.mesh.devices.size
            spec = PartitionSpec(AXIS) if a.ndim >= 1 and a.shape[0] % n == 0 else PartitionSpec()
            return jax.device_put(a, NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map(put, x)

    def describe(self) -> list[str]:
        """The devices, as recorded in ``provenance.devices``."""
        return [str(d) for d in self.devices]


def commit(tree, like):
    """``tree``'s arrays committed to the device of ``like`` when ``like`` lives on one.

    ``jit`` keys its compiled code on where each argument is placed, and an array
    made outside ``jit`` (``jnp.zeros``, a restored snapshot) is *uncommitted*
    while every output of a call on committed inputs is committed: a loop that
    feeds its outputs back in would compile each shape twice. Committing the
    inputs of a call makes the first call and every later one look alike. Python
    scalars are left as they are; sharded ``like`` (several devices) changes
    nothing, since there the outputs' layout is XLA's to choose."""
    devices = getattr(like, "devices", None)
    if devices is None or len(devices()) != 1:
        return tree
    dev = next(iter(devices()))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, dev) if isinstance(x, jax.Array) else x, tree
    )
