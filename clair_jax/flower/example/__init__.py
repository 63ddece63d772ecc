"""A Flower app fine-tuning a Flax LoRA Transformer on text copying, aggregated by CLAIR.

``server_app.app`` and ``client_app.app`` are the ServerApp and ClientApp;
:mod:`~clair_jax.flower.example.task` holds the settings (Flower's run config)
and the deterministic model, data and training both sides share. Run it with
Flower's simulation runtime::

    from flwr.simulation import run_simulation
    from clair_jax.flower.example import client_app, server_app

    run_simulation(server_app.app, client_app.app, num_supernodes=8)

or with ``flwr run`` from ``examples/flower_text_copy`` (its ``pyproject.toml``).
"""
