"""cifs_jax: CIFS (Yan et al., ICML 2021) in JAX/Flax.

Subpackages are imported on demand::

    from cifs_jax import attacks, losses, models

Importing the package has one side effect: on a tested jaxlib it adds an
XLA flag that runs CPU convolutions on XLA's faster path, unless
``XLA_FLAGS`` already chooses (``cifs_jax.xla_flags``).
"""

from cifs_jax import xla_flags

xla_flags.prefer_eigen_convolutions_on_cpu()

__version__ = "0.1.0"
