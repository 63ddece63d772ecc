"""Synthetic federations: a shared low-rank model, contaminated clients."""
