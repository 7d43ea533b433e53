"""Confide: privacy-preserving federated fine-tuning of transformers on Flower."""

__version__ = "0.1.0"
