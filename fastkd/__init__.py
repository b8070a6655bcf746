"""fastkd: throughput-first knowledge distillation (WSLD) for image classifiers."""

__version__ = "0.1.0"
