"""saeforge: train sparse autoencoders on LM activations and explain their features."""

__version__ = "0.1.0"
