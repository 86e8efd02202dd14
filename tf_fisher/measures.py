"""Spectral measures of the per-example Gram matrix and their running values.

Liao, Drummond, Reid and Carneiro, "Approximate Fisher Information Matrix to
Characterise the Training of Deep Neural Networks", IEEE TPAMI 2020, define
for the Gram matrix F_k of iteration k, with learning rate α_k and batch size
B_k:

* the truncated condition number c_k = sqrt(λ_max / λ_min) over the nonzero
  eigenvalues of F_k, i.e. the ratio of the largest to the smallest nonzero
  singular value of J_k;
* the weighted energy l_k = (α_k / B_k) · sqrt(Tr F_k);
* C̄_K, the mean of c_k over every sampled iteration since training began;
* L_K, the sum of l_k over sampled iterations divided by the sampling ratio
  (sampled iterations / all iterations), an estimate of the sum over all
  iterations.

Eigenvalues below zero are round-off and are clamped to 0. An eigenvalue
counts as nonzero when it exceeds `tolerance · λ_max`. With tolerance 0 only
exact zeros are dropped, as in the authors' code. Once a network fits some
examples, their gradients shrink towards zero and the spectrum runs on
continuously down to the round-off floor, so c_k depends on where the
nonzero set is cut. The default, `DEFAULT_TOLERANCE` = 1e-9 (singular values
down to about 3e-5 σ_max), is where the float32 Gram of this package and a
float64 Jᵀ J agree: for the MLP on the embedded digits after one epoch at
batch 128, c_k from the two matched to 1e-6 for every tolerance from 1e-9 to
1e-5, and differed by up to 3% at tolerance 0. J has one row per parameter,
so F has at most P nonzero eigenvalues, and with `max_rank` = P only the
largest P can count. That matters when the batch has more examples than the
model has trainable parameters, such as a small head on a frozen base, and
the blocks come from float32 products: their round-off leaves the zero
eigenvalues near 1e-8 λ_max, above the default tolerance.
(`tf_fisher.gram.product_dtype` forms the blocks of models that small from
float64 products.) When no eigenvalue is nonzero (all gradients zero),
c_k is undefined: it is NaN in the per-sample record and is left out of C̄_K.

NOTE: `max_rank` is the only bound applied here. Where J has a lower rank
for another reason and the blocks come from float32 products, round-off
eigenvalues may still exceed the default tolerance. A larger tolerance,
such as 1e-7, drops them.
"""

import math

import tensorflow as tf

from tf_fisher import gradient_statistics

DEFAULT_TOLERANCE = 1e-9

# Names of the per-sample values that `spectrum_statistics` returns, in the
# order of the per-sample CSV columns.
SPECTRUM_KEYS = (
    "lambda_max",
    "lambda_min",
    "rank",
    "trace",
    "condition_number",
)


def clamped_eigenvalues(gram):
    """Eigenvalues of a symmetric `[batch, batch]` matrix, negatives set to 0.

    Returns:
        `[batch]` tensor in ascending order, in the dtype of `gram`. All NaN
        when `gram` has a NaN or infinite entry (a diverged step), where
        `tf.linalg.eigvalsh` would raise.
    """
    gram = 0.5 * (gram + tf.linalg.matrix_transpose(gram))
    finite = tf.reduce_all(tf.math.is_finite(gram))
    safe_gram = tf.where(finite, gram, tf.zeros_like(gram))
    # NOTE: NumPy's LAPACK (`syevd`, OpenBLAS) alone took 9.5 ms for a
    # 512 x 512 float64 matrix on one AMD EPYC core, against 12.5 ms here.
    # Called from the compiled step through `tf.numpy_function`, it saved
    # nothing measurable in the MLP's probed step at batch 512 (22 ms
    # either way) and added 0.5 ms at batch 128, so the eigenvalues stay in
    # TensorFlow. With two OpenBLAS threads it also slowed the training step
    # after each probe, because the idle worker thread kept spinning.
    eigenvalues = tf.linalg.eigvalsh(safe_gram)
    eigenvalues = tf.maximum(eigenvalues, tf.zeros([], gram.dtype))
    return tf.where(finite, eigenvalues, tf.constant(math.nan, gram.dtype))


def spectrum_statistics(gram, tolerance=DEFAULT_TOLERANCE, max_rank=None):
    """Measure one Gram matrix.

    Args:
        gram: `[batch, batch]` symmetric positive semi-definite matrix.
        tolerance: an eigenvalue counts as nonzero when it is larger than
            `tolerance * lambda_max`; 0 keeps every positive eigenvalue.
        max_rank: None, or the number P of parameters, the rows of J. F = Jᵀ
            J then has at most P nonzero eigenvalues, so only the largest P
            can count as nonzero; the others are round-off.

    NOTE: pass a float64 matrix, as `tf_fisher.gram` builds it. A float32
    matrix carries round-off near 1e-7 · lambda_max in its eigenvalues, far
    above the default tolerance, so zero eigenvalues would count as nonzero.

    Returns:
        A dict of scalar tensors in the dtype of `gram`, keyed by
        `SPECTRUM_KEYS`: the largest eigenvalue, the smallest nonzero one (NaN
        when none is nonzero), the number of nonzero eigenvalues, the trace
        Σ_i ‖g_i‖², and c_k = sqrt(lambda_max / lambda_min) (NaN when no
        eigenvalue is nonzero).
    """
    eigenvalues = clamped_eigenvalues(gram)
    lambda_max = tf.reduce_max(eigenvalues)
    threshold = tf.cast(tolerance, gram.dtype) * lambda_max
    nonzero = eigenvalues > threshold
    if max_rank is not None:
        # Ascending order: the largest `max_rank` come last.
        size = tf.shape(eigenvalues)[0]
        nonzero &= tf.range(size) >= size - max_rank
    rank = tf.reduce_sum(tf.cast(nonzero, gram.dtype))
    nan = tf.constant(math.nan, gram.dtype)
    inf = tf.constant(math.inf, gram.dtype)
    lambda_min = tf.reduce_min(tf.where(nonzero, eigenvalues, inf))
    lambda_min = tf.where(rank > 0, lambda_min, nan)
    condition_number = tf.where(
        rank > 0, tf.sqrt(lambda_max / lambda_min), nan
    )
    return {
        "lambda_max": lambda_max,
        "lambda_min": lambda_min,
        "rank": rank,
        "trace": tf.linalg.trace(gram),
        "condition_number": condition_number,
    }


def fisher_energy(learning_rate, batch_size, trace):
    """Return l_k = (learning_rate / batch_size) * sqrt(trace)."""
    return learning_rate / batch_size * math.sqrt(max(trace, 0.0))


class RunningMeasures:
    """Accumulates C̄_K and L_K over the sampled iterations of a training run.

    One instance lives for the whole run, across epochs and batch-size stages.

    Example:

    >>> running = RunningMeasures()
    >>> running.add_sample(condition_number=4.0, energy=0.5)
    >>> running.add_iterations(2)
    >>> running.mean_condition_number, running.cumulative_energy
    (4.0, 1.0)
    """

    def __init__(self):
        self.condition_number_sum = 0.0
        self.num_defined = 0
        self.energy_sum = 0.0
        self.num_samples = 0
        self.num_iterations = 0

    def add_sample(self, condition_number, energy):
        """Record one sampled iteration; a NaN condition number is skipped."""
        self.num_samples += 1
        if condition_number is not None and math.isfinite(condition_number):
            self.condition_number_sum += condition_number
            self.num_defined += 1
        self.energy_sum += energy

    def add_iterations(self, count=1):
        """Count optimizer iterations, sampled or not."""
        self.num_iterations += count

    @property
    def mean_condition_number(self):
        """C̄_K, or NaN before any sample with a defined c_k."""
        if self.num_defined == 0:
            return math.nan
        return self.condition_number_sum / self.num_defined

    @property
    def cumulative_energy(self):
        """L_K: sampled energy sum over the sampling ratio, or NaN before any
        sample."""
        if self.num_samples == 0:
            return math.nan
        return self.energy_sum * self.num_iterations / self.num_samples

    def restore(self, state):
        """Set the accumulators from a dict that `state` returned, in which
        a JSON file may have turned NaN into None."""

        def number(key):
            value = state[key]
            return math.nan if value is None else float(value)

        self.condition_number_sum = number("condition_number_sum")
        self.num_defined = int(state["num_defined"])
        self.energy_sum = number("energy_sum")
        self.num_samples = int(state["num_samples"])
        self.num_iterations = int(state["num_iterations"])

    def state(self):
        """Return the accumulators as a dict, for checkpoints and summaries."""
        return {
            "condition_number_sum": self.condition_number_sum,
            "num_defined": self.num_defined,
            "energy_sum": self.energy_sum,
            "num_samples": self.num_samples,
            "num_iterations": self.num_iterations,
        }


def is_probe_step(step_in_epoch, interval):
    """Return True at steps 0, N, 2N, ... of an epoch (iterations 1, 1+N, ...).

    Args:
        step_in_epoch: 0-based index of the step within its epoch.
        interval: N, the number of steps between probes; 1 probes every step.
    """
    return step_in_epoch % interval == 0


# Names of everything a probe records, in per-sample CSV column order.
PROBE_KEYS = (
    ("batch_size",) + SPECTRUM_KEYS + gradient_statistics.GRADIENT_KEYS
)


def probe_statistics(gram, tolerance=DEFAULT_TOLERANCE, max_rank=None):
    """Measure one probed batch: its size, `spectrum_statistics` and
    `tf_fisher.gradient_statistics.gradient_statistics`.

    Returns:
        A dict of scalar tensors keyed by `PROBE_KEYS`; the gradient
        statistics are float64, the others in the dtype of `gram`.
    """
    statistics = {"batch_size": tf.cast(tf.shape(gram)[0], gram.dtype)}
    statistics.update(spectrum_statistics(gram, tolerance, max_rank))
    statistics.update(gradient_statistics.gradient_statistics(gram))
    return statistics
