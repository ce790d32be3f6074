"""CIFS: channel-wise importance-based feature selection (Section 3.2).

At a CIFS-modified layer with features z of shape (N, H, W, C):

1. a probe A (global average pool, then a linear or MLP head) makes a raw
   prediction p = A(z), logits (N, K);
2. the channels' relevances g (N, C) are the gradient of the sum of the
   selected logits with respect to a per-channel perturbation delta (N, C)
   broadcast over space, at delta = 0 (Eq. 1), on stop_gradient(z);
3. an importance-mask generating function (IMGF) maps g to a non-negative mask
   m (N, C), and the layer outputs z * m broadcast over space.

The selected classes are the top-k predictions of A in inference mode; in
training mode the true label replaces the top-1 prediction.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cifs_jax.models import layers
from cifs_jax.validation import check_choice

Array = jax.Array

PROBES = ("linear", "mlp")
IMGFS = ("softmax", "sigmoid", "softplus")
LABEL_SUBSTITUTIONS = ("reference", "deduplicated")
RELEVANCE_GRADS = ("stop", "full")
# The paper's slopes: sigmoid alpha = 10 (a near switch), softplus alpha = 5.
DEFAULT_ALPHA = {"sigmoid": 10.0, "softplus": 5.0}


class Probe(nn.Module):
  """The probe network A_l: global average pool, then a classifier head.

  Attributes:
    num_classes: K, the number of logits.
    kind: "linear" (one Dense) or "mlp" (Dense(hidden), softplus with
      beta = 5, Dense(K): the paper's and the authors' "nonlinear" probe).
    hidden: width of the MLP's hidden layer (128; the authors use 240 on
      WRN-28-10).
    zero_bias: start the biases at zero (the authors' WRN) instead of
      PyTorch's default uniform init (their ResNets).
  """

  num_classes: int
  kind: str = "linear"
  hidden: int = 128
  zero_bias: bool = False

  @nn.compact
  def __call__(self, features: Array) -> Array:
    """(N, H, W, C) features -> (N, K) logits."""
    check_choice("probe", self.kind, PROBES)
    pooled = layers.global_average_pool(features)
    if self.kind == "mlp":
      pooled = layers.torch_linear(
        self.hidden, pooled.shape[-1], name="hidden", zero_bias=self.zero_bias
      )(pooled)
      pooled = layers.torch_softplus(pooled, beta=5.0)
    return layers.torch_linear(
      self.num_classes, pooled.shape[-1], name="head", zero_bias=self.zero_bias
    )(pooled)


def relevance_class_weights(
  logits: Array,
  labels: Array | None,
  topk: int,
  substitute_label: bool,
  label_substitution: str = "reference",
) -> Array:
  """How many times each class's logit enters the sum of Eq. 1: (N, K).

  Args:
    logits: probe logits (N, K).
    labels: (N,) integer labels; used only when ``substitute_label``.
    topk: k, the number of selected classes.
    substitute_label: training mode: the true label replaces the top-1.
    label_substitution: "reference": the label plus predictions 2..k, as the
      authors' code does; when the label is itself among predictions 2..k it
      is then counted twice. "deduplicated": the label plus the k - 1
      highest-scoring other classes.

  Returns:
    Float weights w (N, K) so that sum(w * logits) is the objective of Eq. 1.
  """
  num_classes = logits.shape[-1]
  if not 1 <= topk <= num_classes:
    raise ValueError(f"topk={topk} must be in [1, {num_classes}].")
  if not substitute_label:
    selected = lax.top_k(logits, topk)[1]
  else:
    check_choice("label_substitution", label_substitution, LABEL_SUBSTITUTIONS)
    if labels is None:
      raise ValueError(
        "CIFS in training mode needs the labels (they replace "
        "the top-1 prediction); pass labels=... or train=False."
      )
    if label_substitution == "reference":
      others = lax.top_k(logits, topk)[1][:, 1:]
    else:
      is_label = jax.nn.one_hot(labels, num_classes, dtype=bool)
      others = lax.top_k(jnp.where(is_label, -jnp.inf, logits), topk - 1)[1]
    selected = jnp.concatenate(
      [labels[:, None].astype(others.dtype), others], axis=1
    )
  return jnp.sum(
    jax.nn.one_hot(selected, num_classes, dtype=logits.dtype), axis=1
  )


def importance_mask(
  relevance: Array,
  imgf: str,
  temperature: float = 1.0,
  alpha: float | None = None,
) -> Array:
  """The IMGF: relevances g (N, C) -> non-negative mask m (N, C).

  softmax: softmax(g / temperature) over channels (sums to one);
  sigmoid: 1 / (1 + exp(-alpha g)); softplus: log(1 + exp(alpha g)) / alpha.
  ``alpha`` defaults to 10 (sigmoid) and 5 (softplus), as in the paper.
  """
  check_choice("imgf", imgf, IMGFS)
  if imgf == "softmax":
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}.")
    return jax.nn.softmax(relevance / temperature, axis=-1)
  alpha = DEFAULT_ALPHA[imgf] if alpha is None else alpha
  if alpha <= 0:
    raise ValueError(f"alpha must be > 0, got {alpha}.")
  if imgf == "sigmoid":
    return jax.nn.sigmoid(alpha * relevance)
  return jax.nn.softplus(alpha * relevance) / alpha


@dataclasses.dataclass(frozen=True)
class CIFSOptions:
  """The options of a CIFS layer; the keys of the ``model.cifs`` config
  section (besides the placement: layers, probes, mlp_hidden).

  This dataclass is the one place where an option and its default are
  written: the config section, ``Defense`` and ``CIFS`` all take it.

  Attributes:
    topk: k, the number of classes whose logits define the relevance.
    imgf: "softmax", "sigmoid" or "softplus".
    temperature: softmax temperature T (> 0).
    alpha: sigmoid/softplus slope (> 0; None: 10 for sigmoid, 5 for
      softplus).
    mask_scale: factor on the mask (some of the authors' runs use 2 with
      softmax; the default 1 matches the paper).
    label_substitution: "reference" or "deduplicated", see
      ``relevance_class_weights``.
    relevance_grad: "stop" (the authors' behaviour): relevances are computed
      on stop_gradient(features), so the mask is a constant for any gradient
      with respect to the features or the input, while the loss still reaches
      the probe's parameters through the mask (second order). "full": no stop
      gradient; the mask's dependence on the features is differentiated too
      (for honest white-box attacks).
  """

  topk: int = 2
  imgf: str = "softmax"
  temperature: float = 1.0
  alpha: float | None = None
  mask_scale: float = 1.0
  label_substitution: str = "reference"
  relevance_grad: str = "stop"

  def __post_init__(self):
    check_choice("imgf", self.imgf, IMGFS)
    check_choice(
      "label_substitution", self.label_substitution, LABEL_SUBSTITUTIONS
    )
    check_choice("relevance_grad", self.relevance_grad, RELEVANCE_GRADS)
    if (
      isinstance(self.topk, bool)
      or not isinstance(self.topk, int)
      or (self.topk < 1)
    ):
      raise ValueError(f"topk={self.topk!r} must be an int >= 1.")


class CIFS(nn.Module):
  """Channel-wise importance-based feature selection layer (Section 3.2).

  Attributes:
    num_classes: K, the probe's number of logits.
    probe: "linear" or "mlp".
    mlp_hidden: hidden width of the MLP probe.
    zero_bias: the probe's biases start at zero (see ``Probe``).
    options: k, the IMGF, the gradient mode, ... (see ``CIFSOptions``).
  """

  num_classes: int
  probe: str = "linear"
  mlp_hidden: int = 128
  zero_bias: bool = False
  options: CIFSOptions = CIFSOptions()

  @nn.compact
  def __call__(
    self, features: Array, labels: Array | None = None, train: bool = False
  ) -> tuple[Array, Array]:
    """Selects channels of ``features``.

    Args:
      features: (N, H, W, C) feature map.
      labels: (N,) integer labels; required when ``train`` is True, ignored
        otherwise.
      train: training mode (label substitution) or inference mode (top-k
        predictions only).

    Returns:
      (masked features (N, H, W, C) in the dtype of ``features``, raw probe
      logits (N, K) of the unmasked features). The spatial means of the
      unmasked channels, the relevances g and the mask m, all (N, C), are
      sown into the "intermediates" collection ("channel_means",
      "relevance", "mask").
    """
    options = self.options
    probe = Probe(
      self.num_classes,
      self.probe,
      self.mlp_hidden,
      self.zero_bias,
      name="probe",
    )
    # The probe runs in at least float32 (float64 stays float64).
    compute_dtype = jnp.promote_types(features.dtype, jnp.float32)
    z = features.astype(compute_dtype)
    raw_logits = probe(z)

    z_relevance = z
    if options.relevance_grad == "stop":
      z_relevance = lax.stop_gradient(z)

    def selected_logit_sum(probe_module, delta):
      logits = probe_module(z_relevance + delta[:, None, None, :])
      weights = lax.stop_gradient(
        relevance_class_weights(
          logits, labels, options.topk, train, options.label_substitution
        )
      )
      return jnp.sum(weights * logits), logits

    zero_shift = jnp.zeros((z.shape[0], z.shape[-1]), compute_dtype)
    (relevance,), _ = nn.grad(
      selected_logit_sum, probe, zero_shift, has_aux=True
    )
    mask = options.mask_scale * importance_mask(
      relevance, options.imgf, options.temperature, options.alpha
    )
    # For analysis (Figures 1 and 3): apply(..., mutable=["intermediates"]).
    # channel_means: each channel's spatial mean before the mask, (N, C).
    self.sow("intermediates", "channel_means", layers.global_average_pool(z))
    self.sow("intermediates", "relevance", relevance)
    self.sow("intermediates", "mask", mask)
    masked = features * mask[:, None, None, :].astype(features.dtype)
    return masked, raw_logits
