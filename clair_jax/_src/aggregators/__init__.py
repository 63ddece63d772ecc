"""Server aggregation rules for federated LoRA and FedRot-LoRA alignment."""
