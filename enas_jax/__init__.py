"""enas_jax: Efficient Neural Architecture Search (Pham et al., ICML 2018) in JAX."""

from enas_jax import xla_options as _xla_options

__version__ = "0.1.0"

# Before any backend starts: XLA:CPU compile options (enas_jax.xla_options).
_xla_options.apply()
