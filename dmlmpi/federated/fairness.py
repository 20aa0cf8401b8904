"""How evenly a global model serves the clients: the spread of its accuracy over their data.

q-FFL (Li et al. 2020) reports the accuracy of the global model on each client's own test data:
its average, its variance and the average of the worst and best 10% of clients. Here the test set
is shared, so a client's accuracy is estimated from its label mix: the model's accuracy on each
class of the test set, weighted by the share of that class in the client's training samples
(exact in expectation when the clients differ in their labels only, as the partitions here do).
The clients' label mixes are partition.class_counts.
"""
from __future__ import annotations

import numpy as np


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of each class's test samples predicted right (NaN for a class absent from the test set)."""
    labels = np.asarray(labels, dtype=np.int64)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    right = np.bincount(labels[np.asarray(predicted) == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return right / total


def client_accuracies(class_accuracy: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each client's expected accuracy: the per-class accuracy weighted by its label mix (classes with no test
    sample left out of the mix)."""
    known = np.isfinite(class_accuracy)
    mix = counts[:, known].astype(np.float64)
    sizes = mix.sum(axis=1)
    if np.any(sizes == 0):
        raise ValueError("a client holds no sample of any class present in the test set")
    return mix @ class_accuracy[known] / sizes


def spread(accuracies: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and mean of the worst and best 10% (at least one client) of the accuracies."""
    acc = np.sort(np.asarray(accuracies, dtype=np.float64))
    if acc.size == 0:
        raise ValueError("spread needs at least one client accuracy")
    tenth = max(1, int(np.ceil(0.1 * acc.size)))
    return dict(client_accuracy_mean=float(acc.mean()), client_accuracy_std=float(acc.std()),
                client_accuracy_worst10=float(acc[:tenth].mean()), client_accuracy_best10=float(acc[-tenth:].mean()))
