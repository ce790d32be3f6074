"""cifs_jax: CIFS (Yan et al., ICML 2021) in JAX/Flax.

Subpackages are imported on demand (no side effects on import)::

    from cifs_jax import attacks, losses, models
"""

__version__ = "0.1.0"
