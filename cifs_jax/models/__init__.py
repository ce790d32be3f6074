"""Flax modules: the CIFS layer and its probes, CAS, and the backbones.

Every backbone's ``apply(variables, x, train=False, labels=None)`` returns
``(logits, probe_logits)``: final logits (N, K) and a list with one (N, K)
array per CIFS/CAS layer in forward order (empty for a vanilla model).
"""

from cifs_jax.models.cas import CAS
from cifs_jax.models.cifs import (
  CIFS,
  CIFSOptions,
  Probe,
  importance_mask,
  relevance_class_weights,
)
from cifs_jax.models.defense import Defense
from cifs_jax.models.factory import (
  DEFAULT_PLACEMENT,
  build_model,
  default_config,
  with_relevance_grad,
)
from cifs_jax.models.resnet import ResNet
from cifs_jax.models.torch_conversion import (
  convert_torch_state_dict,
  export_torch_state_dict,
)
from cifs_jax.models.wide_resnet import WideResNet

__all__ = [
  "CAS",
  "CIFS",
  "CIFSOptions",
  "Probe",
  "Defense",
  "ResNet",
  "WideResNet",
  "DEFAULT_PLACEMENT",
  "build_model",
  "default_config",
  "importance_mask",
  "relevance_class_weights",
  "with_relevance_grad",
  "convert_torch_state_dict",
  "export_torch_state_dict",
]
