"""How far an engine's outputs are from the unmerged model's, per image and over an image set.

* Classifiers: KL(softmax(unmerged) || softmax(engine)) in nats, computed in float64, and top-1
  agreement (plus top-1 accuracy where labels are given).
* Embedding models: 1 - cosine similarity, and k-nearest-neighbour retrieval overlap@k.

Every metric dict carries the generic ``divergence`` (KL, or mean 1 - cosine) and ``agreement``
(top-1 agreement, or overlap@k) that the search ranks by. Pure numpy (and torch's log-softmax);
imports nothing of dsm_export.
"""

from __future__ import annotations

import numpy as np
import torch

KNN_K = 5  # neighbours in the retrieval overlap


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-image ``KL(softmax(p) || softmax(q))`` in nats, computed in float64.

    Args:
        p_logits, q_logits: ``[images, classes]``; p is the reference (the unmerged model).

    Returns:
        ``[images]``.
    """
    p = torch.from_numpy(np.asarray(p_logits, dtype=np.float64)).log_softmax(-1)
    q = torch.from_numpy(np.asarray(q_logits, dtype=np.float64)).log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def agreement_metrics(logits: np.ndarray, unmerged: np.ndarray, labels=None) -> dict:
    """Top-1 agreement with and mean KL to the unmerged model, plus accuracy if labels are given."""
    top, base_top = logits.argmax(-1), unmerged.argmax(-1)
    out = {
        "top1_agreement": float((top == base_top).mean()),
        "kl": float(kl_divergence(unmerged, logits).mean()),
    }
    if labels is not None:
        labels = np.asarray(labels)
        out["top1_accuracy"] = float((top == labels).mean())
        out["baseline_top1_accuracy"] = float((base_top == labels).mean())
    return out


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of ``[N, D]`` arrays, in float64: ``[N]``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-300)


def knn_indices(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows by cosine similarity: ``[N, k]`` indices (ties broken by
    index, stable sort)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=-1, kind="stable")[:, :k]


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = KNN_K) -> float:
    """Retrieval overlap@k: mean over images of |kNN_a ∩ kNN_b| / k, the neighbours found among the
    other images of the set by cosine similarity of embeddings ``a`` and of ``b`` (``[N, D]`` each).
    1.0 for fewer than two images."""
    k = min(k, len(a) - 1)
    if k < 1:
        return 1.0
    na, nb = knn_indices(a, k), knn_indices(b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na.tolist(), nb.tolist())]))


def embedding_metrics(embeddings: np.ndarray, unmerged: np.ndarray, k: int = KNN_K) -> dict:
    """Agreement of embeddings ``[N, D]`` with the unmerged model's: ``cosine_distance`` (mean of
    1 - cosine), ``min_cosine``, ``mean_cosine``, ``knn_overlap`` (overlap@k, see :func:`knn_overlap`),
    plus the generic ``divergence`` (= ``cosine_distance``) and ``agreement`` (= ``knn_overlap``)
    that ``tune`` ranks by."""
    cos = cosine_similarity(embeddings, unmerged)
    overlap = knn_overlap(embeddings, unmerged, k)
    dist = float((1 - cos).mean())
    return {"cosine_distance": dist, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "knn_overlap": overlap, "knn_k": min(k, max(len(cos) - 1, 0)),
            "divergence": dist, "agreement": overlap}


def per_image_divergence(outputs: np.ndarray, unmerged: np.ndarray, embeddings: bool = False) -> np.ndarray:
    """The per-image terms whose mean is :func:`output_metrics`' ``divergence``: ``[N]`` KL in nats
    (:func:`kl_divergence`, the unmerged model as reference) for logits, 1 - cosine for embeddings."""
    if embeddings:
        return 1.0 - cosine_similarity(outputs, unmerged)
    return kl_divergence(unmerged, outputs)


def output_metrics(outputs: np.ndarray, unmerged: np.ndarray, labels=None, embeddings: bool = False) -> dict:
    """:func:`agreement_metrics` for logits, :func:`embedding_metrics` for embeddings; both carry
    ``divergence`` (KL, or mean 1 - cosine) and ``agreement`` (top-1 agreement, or overlap@k)."""
    if embeddings:
        return embedding_metrics(outputs, unmerged)
    m = agreement_metrics(outputs, unmerged, labels)
    return {**m, "divergence": m["kl"], "agreement": m["top1_agreement"]}
