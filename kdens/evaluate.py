"""Evaluation of one model on a dataset: the metrics every ``metrics.json`` carries."""

from __future__ import annotations

from kdens import metrics as M
from kdens.data import Dataset
from kdens.train import predict_logits


def evaluate_model(model, data: Dataset, batch_size: int = 2048) -> dict:
    """Test and validation metrics of a model on a dataset (the keys every metrics.json has)."""
    test = predict_logits(model, data.x_test, batch_size).numpy()
    out = {"test_accuracy": M.accuracy(test, data.y_test), "test_errors": M.errors(test, data.y_test),
           "test_nll": M.nll(test, data.y_test), "test_ece": M.ece(test, data.y_test)}
    if len(data.y_val):
        val = predict_logits(model, data.x_val, batch_size).numpy()
        out.update(val_accuracy=M.accuracy(val, data.y_val), val_nll=M.nll(val, data.y_val))
    else:
        out.update(val_accuracy=float("nan"), val_nll=float("nan"))
    return out
