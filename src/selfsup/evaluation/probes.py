"""Probes on frozen features: linear (logistic regression), weighted kNN, k-means clustering."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler

ArrayLike = np.ndarray | torch.Tensor


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def linear_probe(
    train_f: ArrayLike,
    train_y: ArrayLike,
    test_f: ArrayLike,
    test_y: ArrayLike,
    *,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a multinomial logistic regression (lbfgs, fixed C=1) on standardised
    features. With a single training class it predicts that class."""
    train_f, train_y, test_f, test_y = map(_np, (train_f, train_y, test_f, test_y))
    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    scaler = StandardScaler().fit(train_f)
    clf = LogisticRegression(C=1.0, max_iter=max_iter).fit(scaler.transform(train_f), train_y)
    return float(clf.score(scaler.transform(test_f), test_y))


def knn_accuracy(
    train_f: ArrayLike,
    train_y: ArrayLike,
    test_f: ArrayLike,
    test_y: ArrayLike,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Accuracy of cosine-similarity kNN where each of the k neighbours votes for its class with
    weight exp(sim / temperature) (InstDisc / DINO). k is clipped to the training-set size."""
    classes, train_y = np.unique(_np(train_y), return_inverse=True)
    train = torch.nn.functional.normalize(torch.as_tensor(_np(train_f), dtype=torch.float32), dim=1)
    test = torch.nn.functional.normalize(torch.as_tensor(_np(test_f), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(train_y)
    k = min(k, len(train))
    preds = []
    for chunk in test.split(chunk_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), len(classes))
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    pred = classes[torch.cat(preds).numpy()]
    return float(np.mean(pred == _np(test_y)))


def kmeans_scores(f: ArrayLike, y: ArrayLike, n_clusters: int, seed: int = 0) -> dict[str, float]:
    """k-means (n_init=10) on L2-normalised features: NMI with the labels and the accuracy of the
    best one-to-one cluster-to-class matching (Hungarian)."""
    f = _np(f).astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    _, y = np.unique(_np(y), return_inverse=True)
    pred = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(f)
    counts = np.zeros((n_clusters, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "acc": float(counts[rows, cols].sum() / len(y)),
    }
