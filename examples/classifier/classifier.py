"""A classifier node: ``handler_batch`` serves the model a batch at a time, ``handler`` one input at a time.

KRT_HANDLER_PATH=classifier.py picks ``handler_batch`` (the file has one); ``classifier.py:handler``
runs the same model per message, for comparison (bench/batching.py does both).
"""

from __future__ import annotations

import numpy as np
from classifier_pb2 import Features, Prediction
from model import load


def init(ctx):
    model = load()
    ctx.set("model", model)
    ctx.logger.info("classifier: %s MLP %s", model.backend, "→".join(map(str, model.layers)))


def _features(data, size: int) -> np.ndarray:
    features = Features()
    if not data.Unpack(features):
        raise TypeError(f"expected a classifier.Features payload, got {data.type_url or 'an empty payload'}")
    if len(features.values) != size:
        raise ValueError(f"expected {size} features, got {len(features.values)}")
    return np.asarray(features.values, dtype=np.float32)


def handler(ctx, data):
    model = ctx.get("model")
    labels, scores = model.predict(_features(data, model.inputs)[None, :])
    return Prediction(label=int(labels[0]), score=float(scores[0]))


def handler_batch(ctx, batch):
    """One model call for the whole batch; an input that cannot be read fails alone (its item is the error)."""
    model = ctx.get("model")
    results: list = [None] * len(batch)
    rows, good = [], []
    for i, data in enumerate(batch):
        try:
            rows.append(_features(data, model.inputs))
            good.append(i)
        except (TypeError, ValueError) as exc:
            results[i] = exc
    if rows:
        labels, scores = model.predict(np.stack(rows))
        for i, label, score in zip(good, labels.tolist(), scores.tolist(), strict=True):
            results[i] = Prediction(label=label, score=score)
    return results
