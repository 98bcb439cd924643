"""Watch a trunk learn: leave-one-out kNN on the features of a labelled validation set, every epoch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medfm.evaluate.metrics import score


def knn_scores(
    features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07
) -> dict[str, float]:
    """Leave-one-out weighted kNN (cosine similarity, weights exp(s/T), as in InstDisc/DINO monitors).

    Returns accuracy and, for two classes, ROC AUC of the class-1 vote share; labels < 0 are ignored.
    """
    keep = labels >= 0
    features, labels = features[keep].float(), labels[keep].long()
    n = len(labels)
    classes = torch.unique(labels)
    if n < 3 or len(classes) < 2:
        return {}
    k = min(k, n - 1)
    z = F.normalize(features, dim=1)
    similarity = z @ z.T
    similarity.fill_diagonal_(float("-inf"))
    top, neighbours = similarity.topk(k, dim=1)
    weights = (top / temperature).exp()
    onehot = (labels[neighbours][..., None] == classes).float()
    votes = (weights[..., None] * onehot).sum(dim=1)
    proba = (votes / votes.sum(dim=1, keepdim=True)).numpy()
    y = labels.numpy()
    out = {"knn_acc": float(np.mean(classes.numpy()[proba.argmax(axis=1)] == y))}
    out["knn_auc"] = score("roc_auc", y, proba, classes=classes.numpy())
    return out
