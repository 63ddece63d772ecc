"""Federated rounds: local training, attacks, the round, checkpoints, sharding."""
