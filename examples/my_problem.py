"""An example user problem for flowgen: a small two-layer tanh network.

Use it with any command that takes a problem, e.g.::

    flowgen run optimizers/gd.opt --problem examples/my_problem.py:make_problem \
        --problem-opt width=16

or from Python: ``get_problem("examples/my_problem.py:make_problem", width=16)``.

The contract is small: a function returning ``(loss_fn, w0)``.

* ``w0`` is the initial point, any pytree of float arrays (here a dict);
  flowgen flattens it to one float64 vector and unflattens it for ``loss_fn``.
* ``loss_fn(params)`` takes the same pytree and returns a scalar. Write it with
  ``jax.numpy`` (no ``numpy`` calls, ``float()`` or Python ``if`` on parameter
  values) so flowgen can differentiate it three times.
* Keyword arguments with defaults become problem options (``width=16``).

The data are synthetic and fixed by ``seed``: ``n`` points in ``d`` dimensions
with targets from a random "teacher" tanh network; the student starts from a
small initialisation of its output layer, which makes GD sharpen progressively.
"""

import jax.numpy as jnp
import numpy as np


def make_problem(n: int = 64, d: int = 8, width: int = 16, seed: int = 0):
    """A student tanh net ``x -> W2 tanh(W1 x + b1) + b2`` fitting a teacher.

    Loss: ``½ · mean_i (f(x_i) − y_i)²``. Returns ``(loss_fn, w0)`` with
    ``w0 = {"W1": (d, width), "b1": (width,), "W2": (width, 1), "b2": (1,)}``.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))  # (n, d) inputs
    teacher = rng.standard_normal((d, 4)) / np.sqrt(d)  # (d, 4)
    y = np.tanh(x @ teacher) @ rng.standard_normal((4, 1))  # (n, 1) targets
    x, y = jnp.asarray(x), jnp.asarray(y)

    w0 = {
        "W1": rng.standard_normal((d, width)) / np.sqrt(d),
        "b1": np.zeros(width),
        "W2": 0.1 * rng.standard_normal((width, 1)) / np.sqrt(width),
        "b2": np.zeros(1),
    }

    def loss_fn(params):
        hidden = jnp.tanh(x @ params["W1"] + params["b1"])  # (n, width)
        out = hidden @ params["W2"] + params["b2"]  # (n, 1)
        return 0.5 * jnp.mean((out - y) ** 2)

    return loss_fn, w0
