"""Gradient noise statistics and sampling tests computed from the Gram matrix.

Let g_1, ..., g_B be the per-example gradients of a batch (the columns of J,
each the gradient of one example's loss, so the sum of the g_i is the
gradient of the summed loss), F = Jᵀ J their Gram matrix (F_ij = g_iᵀ g_j),
1 the all-ones vector and ḡ = (1/B) Σ_i g_i the batch gradient, the
gradient of the mean of the B per-example losses, without weight decay and
regularisers. With one loss value per example, that is the gradient of the
mean-reduced training loss. With several loss values per example (a
label per time step), an example's loss is the sum of its values, while
Keras divides the batch's sum by the number n of values (of unmasked
values, under a mask). ḡ is then n / B times the gradient of the
mean-reduced loss, and ‖ḡ‖² is (n / B)² times its squared norm. The
ratios and B_simple do not depend on such a scale. Every statistic below is a
function of F alone:

* ‖ḡ‖² = 1ᵀF1 / B² (`batch_gradient_sq_norm`; 0 where round-off makes
  1ᵀF1 negative);
* the mean ‖g_i‖² = Tr F / B (`example_gradient_sq_norm`);
* tr Σ̂ = Σ_i ‖g_i − ḡ‖² / (B − 1) = (Tr F − 1ᵀF1 / B) / (B − 1), the
  unbiased estimate of the trace of the per-example gradient covariance
  (`gradient_variance`);
* |G|² = (1ᵀF1 − Tr F) / (B (B − 1)), the mean of g_iᵀ g_j over i ≠ j, an
  unbiased estimate of the squared norm of the expected gradient
  (`unbiased_gradient_sq_norm`; it can be negative when the batch gradient
  is mostly noise);
* the simple gradient noise scale B_simple = tr Σ̂ / |G|² (`noise_scale`,
  NaN when |G|² <= 0). McCandlish, Kaplan, Amodei and the OpenAI Dota Team,
  "An Empirical Model of Large-Batch Training", 2018, define B_simple =
  tr(Σ) / |G|² and estimate both terms without bias from squared gradient
  norms at two batch sizes; with B_small = 1 and B_big = B their estimators
  are exactly tr Σ̂ and |G|² above. They also advise averaging numerator and
  denominator over many batches before dividing (`epoch_statistics` does);
* the norm test ratio tr Σ̂ / (B ‖ḡ‖²) (`norm_test_ratio`). Byrd, Chin,
  Nocedal and Wu, "Sample Size Selection in Optimization Methods for
  Machine Learning", Mathematical Programming, 2012, accept a sample S when
  ‖Var_{i∈S}(g_i)‖₁ / |S| <= θ² ‖ḡ‖², that is when this ratio is at most θ²,
  and otherwise ask for B · ratio / θ² examples. The ℓ1 norm of the
  coordinate-wise sample variance is tr Σ̂;
* the inner-product test ratio Var_i(g_iᵀḡ) / (B ‖ḡ‖⁴)
  (`inner_product_test_ratio`) and the orthogonality test ratio
  Var_i(g_i − (g_iᵀḡ / ‖ḡ‖²) ḡ) / (B ‖ḡ‖²) (`orthogonality_test_ratio`).
  Bollapragada, Byrd and Nocedal, "Adaptive Sampling Strategies for
  Stochastic Optimization", SIAM Journal on Optimization, 2018, accept a
  sample when these are at most θ² and ν² respectively. With a = F1 / B (a_i =
  g_iᵀḡ, whose mean is ‖ḡ‖²), Var_i(g_iᵀḡ) = (‖a‖² − B ‖ḡ‖⁴) / (B − 1) and
  the orthogonal variance is (Tr F − ‖F1‖² / 1ᵀF1) / (B − 1), because the
  orthogonal components have mean zero;
* the mean, standard deviation (over the batch, divided by B), minimum and
  maximum of the per-example gradient norms ‖g_i‖ = sqrt(F_ii)
  (`example_gradient_norm_*`).

Variances need B >= 2 and are NaN for a batch of one; ratios whose
denominator is 0 are NaN.
"""

import math

import tensorflow as tf

# Names of the per-probe gradient statistics, in per-sample CSV column order.
GRADIENT_KEYS = (
    "batch_gradient_sq_norm",
    "example_gradient_sq_norm",
    "gradient_variance",
    "unbiased_gradient_sq_norm",
    "noise_scale",
    "norm_test_ratio",
    "inner_product_test_ratio",
    "orthogonality_test_ratio",
    "example_gradient_norm_mean",
    "example_gradient_norm_std",
    "example_gradient_norm_min",
    "example_gradient_norm_max",
)


def _ratio(numerator, denominator, positive):
    """numerator / denominator where `positive` holds, NaN elsewhere."""
    nan = tf.constant(math.nan, numerator.dtype)
    safe = tf.where(positive, denominator, tf.ones_like(denominator))
    return tf.where(positive, numerator / safe, nan)


def gradient_statistics(gram):
    """Compute the gradient statistics of one batch from its Gram matrix.

    Args:
        gram: `[batch, batch]` Gram matrix F = Jᵀ J of the per-example
            gradients. It is symmetrised and computed on in float64.

    Returns:
        A dict of float64 scalar tensors keyed by `GRADIENT_KEYS`; the module
        docstring gives each formula.
    """
    gram = tf.cast(gram, tf.float64)
    gram = 0.5 * (gram + tf.linalg.matrix_transpose(gram))
    batch = tf.cast(tf.shape(gram)[0], tf.float64)
    zero = tf.zeros([], tf.float64)
    several = batch > 1
    denominator = tf.maximum(batch - 1, 1)

    row_sums = tf.reduce_sum(gram, axis=1)  # F1, [batch]
    total = tf.reduce_sum(row_sums)  # 1ᵀF1
    trace = tf.linalg.trace(gram)
    # 1ᵀF1 = ‖Σ_i g_i‖² >= 0, but round-off makes it slightly negative when
    # the gradients cancel.
    batch_sq_norm = tf.maximum(total, zero) / batch**2
    has_gradient = batch_sq_norm > 0

    nan = tf.constant(math.nan, tf.float64)
    variance = tf.where(
        several, tf.maximum(trace - total / batch, zero) / denominator, nan
    )
    unbiased_sq_norm = _ratio(total - trace, batch * (batch - 1), several)

    projections = row_sums / batch  # a_i = g_iᵀ ḡ, [batch]
    inner_variance = tf.maximum(
        tf.reduce_sum(projections**2) - batch * batch_sq_norm**2, zero
    ) / denominator
    safe_total = tf.where(has_gradient, total, tf.ones_like(total))
    orthogonal_variance = tf.maximum(
        trace - tf.reduce_sum(row_sums**2) / safe_total, zero
    ) / denominator

    norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), zero))
    statistics = {
        "batch_gradient_sq_norm": batch_sq_norm,
        "example_gradient_sq_norm": trace / batch,
        "gradient_variance": variance,
        "unbiased_gradient_sq_norm": unbiased_sq_norm,
        "noise_scale": _ratio(
            variance, unbiased_sq_norm, several & (unbiased_sq_norm > 0)
        ),
        "norm_test_ratio": _ratio(
            variance, batch * batch_sq_norm, several & has_gradient
        ),
        "inner_product_test_ratio": _ratio(
            inner_variance, batch * batch_sq_norm**2, several & has_gradient
        ),
        "orthogonality_test_ratio": _ratio(
            orthogonal_variance, batch * batch_sq_norm, several & has_gradient
        ),
        "example_gradient_norm_mean": tf.reduce_mean(norms),
        "example_gradient_norm_std": tf.math.reduce_std(norms),
        "example_gradient_norm_min": tf.reduce_min(norms),
        "example_gradient_norm_max": tf.reduce_max(norms),
    }
    return statistics


def epoch_statistics(rows):
    """Average the gradient statistics of the probes of one epoch.

    Each key is the mean of its finite values over `rows`, except
    `noise_scale`, which is the ratio of the means of `gradient_variance` and
    `unbiased_gradient_sq_norm` (averaging numerator and denominator before
    dividing, as McCandlish et al. 2018 advise, because a single |G|²
    estimate is noisy and can be negative).

    Args:
        rows: sequence of dicts holding the `GRADIENT_KEYS` of each probe.

    Returns:
        A dict of floats keyed by `GRADIENT_KEYS`; NaN where no probe has a
        finite value (or the mean |G|² is not positive, for `noise_scale`).
    """
    means = {
        key: _finite_mean(row.get(key) for row in rows)
        for key in GRADIENT_KEYS
    }
    denominator = means["unbiased_gradient_sq_norm"]
    if math.isfinite(denominator) and denominator > 0:
        means["noise_scale"] = means["gradient_variance"] / denominator
    else:
        means["noise_scale"] = math.nan
    return means


def _finite_mean(values):
    finite = [
        float(value) for value in values
        if value is not None and math.isfinite(float(value))
    ]
    if not finite:
        return math.nan
    return sum(finite) / len(finite)
