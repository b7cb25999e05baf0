"""The example's model: an MLP classifier whose weights are generated from a fixed seed (nothing to download).

``load()`` returns the torch variant when torch is installed (on the GPU when there is one) and the
numpy one otherwise; both compute the same function from the same weights. ``CLASSIFIER_LAYERS``
sets the layer sizes (default ``512,2048,2048,16``: 512 features in, 16 classes out) and
``CLASSIFIER_BACKEND`` forces ``numpy`` or ``torch``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

__all__ = ["DEFAULT_LAYERS", "NumpyMLP", "TorchMLP", "load", "parameters"]

DEFAULT_LAYERS = (512, 2048, 2048, 16)
_SEED = 20240601


def parameters(layers: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weights, bias) per layer, float32, He-initialised from a fixed seed: the same on every replica."""
    rng = np.random.default_rng(_SEED)
    return [((rng.standard_normal((n_in, n_out), dtype=np.float32) * np.float32(np.sqrt(2.0 / n_in))),
             rng.standard_normal(n_out, dtype=np.float32) * np.float32(0.01))
            for n_in, n_out in itertools.pairwise(layers)]


class NumpyMLP:
    """ReLU MLP on numpy: one matrix product per layer for the whole batch (the GIL is released meanwhile)."""

    backend = "numpy"

    def __init__(self, layers: tuple[int, ...] = DEFAULT_LAYERS) -> None:
        self.layers = layers
        self.inputs = layers[0]
        self._params = parameters(layers)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x``: (batch, inputs) float32 → (label, probability of that label) per row."""
        last = len(self._params) - 1
        for i, (weights, bias) in enumerate(self._params):
            x = x @ weights
            x += bias
            if i < last:
                np.maximum(x, 0, out=x)
        x -= x.max(axis=1, keepdims=True)
        np.exp(x, out=x)
        labels = x.argmax(axis=1)
        scores = x[np.arange(len(x)), labels] / x.sum(axis=1)
        return labels, scores


class TorchMLP:
    """The same network on torch, on ``device`` (``cuda`` when available)."""

    backend = "torch"

    def __init__(self, layers: tuple[int, ...] = DEFAULT_LAYERS, device: str | None = None) -> None:
        import torch

        self._torch = torch
        self.layers = layers
        self.inputs = layers[0]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._params = [(torch.from_numpy(w).to(self.device), torch.from_numpy(b).to(self.device))
                        for w, b in parameters(layers)]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, non_blocking=True)
            last = len(self._params) - 1
            for i, (weights, bias) in enumerate(self._params):
                t = torch.addmm(bias, t, weights)
                if i < last:
                    t = torch.relu_(t)
            scores, labels = torch.softmax(t, dim=1).max(dim=1)
            return labels.cpu().numpy(), scores.cpu().numpy()  # waits for the GPU, with the GIL released


def _layers() -> tuple[int, ...]:
    raw = os.environ.get("CLASSIFIER_LAYERS", "")
    return tuple(int(n) for n in raw.split(",")) if raw else DEFAULT_LAYERS


def load(backend: str | None = None) -> Any:
    """The torch variant when torch is installed, else numpy (``CLASSIFIER_BACKEND`` decides when set)."""
    backend = backend or os.environ.get("CLASSIFIER_BACKEND", "auto")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"CLASSIFIER_BACKEND={backend!r}: expected auto, numpy or torch")
    if backend != "numpy":
        try:
            return TorchMLP(_layers())
        except ImportError:
            if backend == "torch":
                raise
    return NumpyMLP(_layers())
