"""What the experiment measures: detection scores and accuracy by kind of token."""

from __future__ import annotations

import numpy as np

from clair_jax._src import data as data_lib


def detection(flag_counts, participation_counts, truth) -> dict[str, float | None]:
    """Precision/recall/F1 of the clients flagged in most of the rounds they joined.

    Precision is ``None`` when nothing is flagged (and F1 then 0 if something
    was to be found).
    """
    flag_counts, participation_counts = np.asarray(flag_counts), np.asarray(participation_counts)
    truth = np.asarray(truth, bool)
    flagged = 2 * flag_counts > np.maximum(participation_counts, 1)
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = 0.0 if tp + fn else None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flagged": flagged.tolist(),
        "num_flagged": int(flagged.sum()),
    }


TOKEN_KINDS = ("shared", "specific", "other")
"""Kinds of source tokens: re-mapped alike by benign clients, per client, or copied."""


def token_kinds(fed: data_lib.Federation, length: int) -> np.ndarray:
    """Kind of the source token behind every held-out target position.

    Returns:
      ``(n, m, 2 * length)`` ints: the index in :data:`TOKEN_KINDS` of the token
      that target position copies (0: one of ``fed.shared_sources``, 1: one of
      ``fed.specific_sources``, 2: any other token), ``-1`` where nothing is
      scored (the mask is 0).
    """
    inputs = np.asarray(fed.test.inputs)
    source = np.full(inputs.shape, -1)
    source[..., length:] = inputs[..., :length]  # target t copies input t - length
    kinds = np.where(
        np.isin(source, np.asarray(fed.shared_sources)),
        0,
        np.where(np.isin(source, np.asarray(fed.specific_sources)), 1, 2),
    )
    return np.where(np.asarray(fed.test.mask) > 0, kinds, -1)


def accuracy_by_token(correct, kinds, benign) -> dict[str, float | None]:
    """Mean over benign clients of each client's accuracy on each kind of token.

    Args:
      correct: ``(n, m, t)`` bool, whether each prediction is right.
      kinds: ``(n, m, t)`` from :func:`token_kinds`.
      benign: ``(n,)`` bool.
    """
    correct, kinds = np.asarray(correct), np.asarray(kinds)
    out = {}
    for k, name in enumerate(TOKEN_KINDS):
        per_client = [
            correct[i][kinds[i] == k].mean()
            for i in np.flatnonzero(benign)
            if np.any(kinds[i] == k)
        ]
        out[name] = float(np.mean(per_client)) if per_client else None
    return out
