"""Tests of the spectral measures and their running values on known spectra."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tf_fisher import gram
from tf_fisher import measures


def gram_with_eigenvalues(eigenvalues, seed=0):
    """Return Q diag(λ) Qᵀ, float64, with Q a random orthogonal matrix."""
    size = len(eigenvalues)
    rotation = stats.ortho_group.rvs(size, random_state=seed)
    return tf.constant(
        rotation @ np.diag(eigenvalues) @ rotation.T, dtype=tf.float64
    )


def statistics(matrix, tolerance=measures.DEFAULT_TOLERANCE):
    values = measures.spectrum_statistics(matrix, tolerance)
    return {key: float(value) for key, value in values.items()}


def test_spectrum_matches_closed_form():
    eigenvalues = [9.0, 4.0, 2.5, 0.25, 0.0, 0.0]
    result = statistics(gram_with_eigenvalues(eigenvalues))
    assert set(result) == set(measures.SPECTRUM_KEYS)
    assert result["lambda_max"] == pytest.approx(9.0, rel=1e-12)
    assert result["lambda_min"] == pytest.approx(0.25, rel=1e-10)
    assert result["rank"] == 4
    assert result["trace"] == pytest.approx(15.75, rel=1e-12)
    assert result["condition_number"] == pytest.approx(6.0, rel=1e-10)


def test_spectrum_float32_gram():
    # float32 eigenvalues carry round-off near 1e-7 λ_max, so an exact zero
    # needs a tolerance above that to be dropped.
    matrix = gram_with_eigenvalues([16.0, 1.0, 0.0], seed=1)
    matrix = tf.cast(matrix, tf.float32)
    values = measures.spectrum_statistics(matrix, tolerance=1e-5)
    assert values["condition_number"].dtype == tf.float32
    assert float(values["condition_number"]) == pytest.approx(4.0, rel=1e-4)
    assert float(values["rank"]) == 2


@pytest.mark.parametrize(
    "small, tolerance, rank",
    [
        (1.01e-3, 1e-3, 3),
        (0.99e-3, 1e-3, 2),
        (1e-12, 0.0, 3),
        (1e-12, measures.DEFAULT_TOLERANCE, 2),
    ],
    ids=["just_above", "just_below", "zero_keeps_tiny", "default_drops_tiny"],
)
def test_tolerance_is_relative_to_lambda_max(small, tolerance, rank):
    result = statistics(
        gram_with_eigenvalues([1.0, 0.5, small], seed=2), tolerance
    )
    assert result["rank"] == rank
    expected_min = small if rank == 3 else 0.5
    assert result["lambda_min"] == pytest.approx(expected_min, rel=1e-3)
    assert result["condition_number"] == pytest.approx(
        math.sqrt(1.0 / expected_min), rel=1e-3
    )


@pytest.mark.parametrize(
    "max_rank, rank, lambda_min",
    [(None, 6, 1e-8), (3, 3, 1.0), (6, 6, 1e-8), (10, 6, 1e-8)],
    ids=["none", "three", "batch", "above_batch"],
)
def test_max_rank_keeps_largest_eigenvalues(max_rank, rank, lambda_min):
    """Three examples too many for three parameters: their round-off
    eigenvalues, above the default tolerance, count only without the
    bound."""
    matrix = gram_with_eigenvalues([9.0, 4.0, 1.0, 3e-8, 2e-8, 1e-8], seed=4)
    values = measures.spectrum_statistics(matrix, max_rank=max_rank)
    assert float(values["rank"]) == rank
    assert float(values["lambda_max"]) == pytest.approx(9.0, rel=1e-12)
    assert float(values["lambda_min"]) == pytest.approx(lambda_min, rel=1e-6)
    assert float(values["condition_number"]) == pytest.approx(
        math.sqrt(9.0 / lambda_min), rel=1e-6
    )


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_tolerance_scales_with_matrix(scale):
    # With tolerance 1e-3 an eigenvalue of 2e-3 λ_max counts and one of
    # 5e-4 λ_max does not, whatever the scale of the matrix.
    kept = statistics(
        gram_with_eigenvalues(np.multiply(scale, [1.0, 0.5, 2e-3]), seed=3),
        1e-3,
    )
    assert kept["rank"] == 3
    assert kept["condition_number"] == pytest.approx(
        math.sqrt(500), rel=1e-9
    )
    dropped = statistics(
        gram_with_eigenvalues(np.multiply(scale, [1.0, 0.5, 5e-4]), seed=3),
        1e-3,
    )
    assert dropped["rank"] == 2
    assert dropped["condition_number"] == pytest.approx(
        math.sqrt(2), rel=1e-9
    )


def test_negative_round_off_is_clamped():
    matrix = gram_with_eigenvalues([4.0, 1.0, -1e-10], seed=4)
    eigenvalues = measures.clamped_eigenvalues(matrix).numpy()
    assert eigenvalues.min() == 0.0
    np.testing.assert_allclose(eigenvalues[1:], [1.0, 4.0], rtol=1e-12)
    for tolerance in (0.0, measures.DEFAULT_TOLERANCE):
        result = statistics(matrix, tolerance)
        assert result["rank"] == 2
        assert result["lambda_min"] == pytest.approx(1.0, rel=1e-10)
        assert result["condition_number"] == pytest.approx(2.0, rel=1e-10)


def test_single_example_batch():
    result = statistics(tf.constant([[2.25]], tf.float64))
    assert result["rank"] == 1
    assert result["lambda_max"] == 2.25
    assert result["lambda_min"] == 2.25
    assert result["trace"] == 2.25
    assert result["condition_number"] == 1.0


def test_all_zero_gram_has_undefined_condition_number():
    result = statistics(tf.zeros([4, 4], tf.float64), tolerance=0.0)
    assert result["rank"] == 0
    assert result["lambda_max"] == 0.0
    assert result["trace"] == 0.0
    assert math.isnan(result["lambda_min"])
    assert math.isnan(result["condition_number"])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_gram_gives_nan_not_error(bad):
    # A diverged step's Gram has no eigendecomposition, so the measures
    # become NaN and training can stop cleanly instead of raising.
    matrix = np.eye(3)
    matrix[0, 1] = matrix[1, 0] = bad
    compiled = tf.function(measures.spectrum_statistics)
    for function in (measures.spectrum_statistics, compiled):
        result = {
            key: float(value)
            for key, value in function(tf.constant(matrix)).items()
        }
        assert result["rank"] == 0
        for key in ("lambda_max", "lambda_min", "condition_number"):
            assert math.isnan(result[key]), key
        assert result["trace"] == 3.0


def linear_model(seed=0):
    inputs = keras.Input((5,))
    logits = keras.layers.Dense(
        3, kernel_initializer=keras.initializers.GlorotNormal(seed=seed)
    )(inputs)
    return keras.Model(inputs, logits)


def test_duplicated_examples_lower_the_rank():
    # Six examples, two of them repeated: J has four distinct columns.
    rng = np.random.default_rng(5)
    distinct = rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 1], np.int32)
    order = [0, 1, 2, 3, 0, 2]
    x = tf.constant(distinct[order])
    y = tf.constant(labels[order])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    matrix = gram.gram_matrix(linear_model(), loss, x, y)

    result = statistics(matrix)
    assert result["rank"] == 4
    distinct_result = statistics(
        gram.gram_matrix(
            linear_model(), loss, tf.constant(distinct), tf.constant(labels)
        )
    )
    assert distinct_result["rank"] == 4
    # Repeating examples 0 and 2 scales their directions, so the trace grows
    # by their squared norms and λ_max cannot shrink.
    diagonal = np.diag(matrix.numpy())
    assert result["trace"] == pytest.approx(
        distinct_result["trace"] + diagonal[0] + diagonal[2], rel=1e-5
    )
    assert result["lambda_max"] >= distinct_result["lambda_max"] * (1 - 1e-6)


def test_zero_gradient_batch():
    # Zero weights and zero targets: the squared error and its gradient
    # vanish for every example.
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2, kernel_initializer="zeros")(inputs)
    model = keras.Model(inputs, outputs)
    x = tf.constant(np.random.default_rng(6).normal(size=(3, 5)), tf.float32)
    matrix = gram.gram_matrix(
        model, keras.losses.MeanSquaredError(), x, tf.zeros([3, 2])
    )
    np.testing.assert_array_equal(matrix.numpy(), np.zeros([3, 3]))
    result = statistics(matrix)
    assert result["rank"] == 0
    assert math.isnan(result["condition_number"])

    running = measures.RunningMeasures()
    running.add_sample(4.0, 1.0)
    running.add_sample(result["condition_number"], 0.0)
    running.add_iterations(10)
    assert running.num_samples == 2
    assert running.num_defined == 1
    assert running.mean_condition_number == 4.0
    # L_K divides by the sampling ratio 2 / 10, the NaN sample included.
    assert running.cumulative_energy == pytest.approx(1.0 * 10 / 2)


def test_running_measures_extrapolate():
    running = measures.RunningMeasures()
    assert math.isnan(running.mean_condition_number)
    assert math.isnan(running.cumulative_energy)
    for condition_number, energy in ((2.0, 0.1), (4.0, 0.2), (9.0, 0.3)):
        running.add_sample(condition_number, energy)
    running.add_iterations(100)
    running.add_iterations()
    assert running.num_iterations == 101
    assert running.mean_condition_number == pytest.approx(5.0)
    # Sum 0.6 over 3 sampled iterations of 101: 0.6 * 101 / 3 = 20.2.
    assert running.cumulative_energy == pytest.approx(20.2)
    assert running.state() == {
        "condition_number_sum": pytest.approx(15.0),
        "num_defined": 3,
        "energy_sum": pytest.approx(0.6),
        "num_samples": 3,
        "num_iterations": 101,
    }


def test_fisher_energy_formula():
    # l = (α / B) sqrt(Tr F): 0.1 / 32 * sqrt(16) = 0.0125.
    assert measures.fisher_energy(0.1, 32, 16.0) == pytest.approx(0.0125)
    assert measures.fisher_energy(0.5, 1, 0.0) == 0.0
    # A negative trace, from round-off, gives zero energy.
    assert measures.fisher_energy(0.5, 4, -1e-12) == 0.0


def test_fisher_energy_from_gradient_norms():
    rng = np.random.default_rng(7)
    jacobian = rng.normal(size=(6, 20))
    matrix = tf.constant(jacobian @ jacobian.T)
    trace = statistics(matrix)["trace"]
    norms = np.linalg.norm(jacobian, axis=1)
    expected = 0.05 / 6 * math.sqrt((norms**2).sum())
    assert measures.fisher_energy(0.05, 6, trace) == pytest.approx(expected)


def test_probe_statistics_adds_batch_size():
    result = measures.probe_statistics(gram_with_eigenvalues([3.0, 1.0]))
    assert tuple(result) == measures.PROBE_KEYS
    assert float(result["batch_size"]) == 2
    assert float(result["condition_number"]) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize(
    "interval, probed",
    [(1, list(range(7))), (3, [0, 3, 6]), (5, [0, 5]), (50, [0])],
)
def test_probe_steps(interval, probed):
    steps = [s for s in range(7) if measures.is_probe_step(s, interval)]
    assert steps == probed
