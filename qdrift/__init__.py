"""qdrift: quantize text-to-image diffusion models and correct them at sampling time with Q-Drift."""

__version__ = "0.1.0"
