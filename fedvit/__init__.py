"""fedvit: personalized federated learning of Vision Transformers on Flower."""

__version__ = "0.1.0"
