"""Contrastive training: config, data, step, trainer, checkpoints, distributed helpers (`clipforge train`)."""
