"""fasttrain: a fast ImageNet-style classifier trainer."""

__version__ = "0.1.0"
