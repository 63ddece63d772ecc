"""LoRA factor types, the LoRA Transformer and its pure-pytree view."""
