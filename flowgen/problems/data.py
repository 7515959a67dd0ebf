"""The built-in data sets: scikit-learn's bundled digits and a toy sorting task.

Both are small, in memory, deterministic and need no network:

* **digits** — the 1797 8×8 grey-level images of handwritten digits that ship
  with scikit-learn (``sklearn.datasets.load_digits``). :func:`digits` takes
  the first ``n`` examples of classes ``0..classes-1`` in dataset order and
  standardises each pixel over them; :func:`digits_images` keeps the 8×8
  layout for convolutional and patch models.
* **sorting** — next-token prediction on the sorted half of a sequence
  (the paper's toy task, after minGPT's demo): draw ``length`` tokens from a
  vocabulary of ``vocab``, append them sorted, and predict each token of the
  sorted half from everything before it. :func:`sorting` generates it from a seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from flowgen.errors import ProblemError

__all__ = ["Sorting", "digits", "digits_images", "one_hot", "sorting"]

#: Pixels in one digits image (8×8).
DIGITS_SIDE = 8


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All of scikit-learn's digits, read once (read-only arrays)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    images, labels = load_digits(return_X_y=True)  # (1797, 64), (1797,)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def digits(
    n: int, classes: int, keep_constant: bool = False
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The first ``n`` digits of classes ``0..classes-1``, each pixel standardised.

    Each pixel is standardised over the ``n`` examples (mean 0, std 1). Pixels
    that are constant on them (std 0) are dropped, or with ``keep_constant``
    kept as columns of exact zeros.

    Returns:
        ``x`` (n, d) float64 with ``d = 64`` minus the dropped pixels, the
        labels (n,) int in ``0..classes-1``, and the dropped pixel indices.

    Raises:
        ProblemError: when fewer than ``n`` examples of those classes exist.
    """
    images, labels = _load_digits()
    mask = labels < classes
    available = int(mask.sum())
    if n > available:
        raise ProblemError(
            f"digits has only {available} examples of classes 0..{classes - 1}, asked for n={n}",
            hint=f"use n <= {available} (or more classes)",
        )
    x = images[mask][:n].astype(np.float64)  # (n, 64)
    y = labels[mask][:n].astype(np.int64)  # (n,)
    mean, std = x.mean(axis=0), x.std(axis=0)  # (64,), (64,)
    constant = std == 0.0
    dropped = [int(i) for i in np.flatnonzero(constant)]
    if keep_constant:
        x = (x - mean) / np.where(constant, 1.0, std)
        x[:, constant] = 0.0  # exactly zero: their weights get identically zero gradients
        dropped = []
    else:
        x = (x[:, ~constant] - mean[~constant]) / std[~constant]
    return x, y, dropped


def digits_images(n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The same examples as :func:`digits` as images: ``x`` (n, 8, 8, 1), labels (n,).

    Pixels standardised as in :func:`digits`; the pixels constant over the
    ``n`` examples (mostly on the border) are exactly 0, the value the
    convolutions pad with.
    """
    x, y, _ = digits(n, classes, keep_constant=True)  # (n, 64), (n,)
    return x.reshape(n, DIGITS_SIDE, DIGITS_SIDE, 1), y


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """``(..., classes)`` float64 rows of the identity, one per label."""
    return np.eye(classes, dtype=np.float64)[labels]


@dataclass(frozen=True)
class Sorting:
    """The sorting task as arrays.

    Attributes:
        tokens: (n, 2·length − 1) int — the unsorted sequence, then the sorted
            one without its last token (the model's input).
        targets: (n, length) int — the sorted sequence: ``targets[:, j]`` is to
            be predicted at input position ``length − 1 + j``.
        vocab: vocabulary size.
        length: tokens to sort.
    """

    tokens: np.ndarray
    targets: np.ndarray
    vocab: int
    length: int

    @property
    def predicted(self) -> slice:
        """The input positions whose next token is scored: ``length-1 .. 2·length-2``."""
        return slice(self.length - 1, 2 * self.length - 1)

    def one_hot(self) -> tuple[np.ndarray, np.ndarray]:
        """The model's input and targets one-hot, float64: ``(n, 2·length − 1, vocab)``
        and ``(n·length, vocab)`` (one row per scored prediction)."""
        n = self.tokens.shape[0]
        x = one_hot(self.tokens, self.vocab)
        return x, one_hot(self.targets, self.vocab).reshape(n * self.length, self.vocab)


def sorting(n: int, vocab: int = 4, length: int = 8, seed: int = 0) -> Sorting:
    """``n`` random sequences of ``length`` tokens in ``0..vocab-1``, with their sorted copies.

    The full sequence is ``s = (u, sort(u))`` of length ``2·length``; the
    model reads ``s[:-1]`` causally and is scored on predicting
    ``s[length:]`` (the sorted half), each from the tokens before it. Tokens
    are drawn uniformly by ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    unsorted = rng.integers(0, vocab, size=(n, length))  # (n, length)
    full = np.concatenate([unsorted, np.sort(unsorted, axis=1)], axis=1)  # (n, 2·length)
    return Sorting(
        tokens=full[:, :-1].astype(np.int64),
        targets=full[:, length:].astype(np.int64),
        vocab=int(vocab),
        length=int(length),
    )
