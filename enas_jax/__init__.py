"""enas_jax: Efficient Neural Architecture Search (Pham et al., ICML 2018) in JAX."""

__version__ = "0.1.0"
