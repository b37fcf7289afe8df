"""ettin-jax: Ettin's paired ModernBERT encoders and decoders in JAX/Flax."""

__version__ = "0.1.0"
