"""sve: Singular Value Ensembles for pretrained transformer checkpoints."""

__version__ = "0.1.0"
