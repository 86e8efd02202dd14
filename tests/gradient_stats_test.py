"""Tests of the gradient statistics computed from the Gram matrix."""

import csv
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_fisher import FisherCallback
from tf_fisher import FisherModel
from tf_fisher import gradient_statistics
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher import run

KEYS = gradient_statistics.GRADIENT_KEYS


def direct_statistics(jacobian):
    """Every statistic from explicit per-example gradients `[batch, P]`, with
    plain NumPy vector operations and no Gram matrix."""
    jacobian = np.asarray(jacobian, np.float64)
    batch = len(jacobian)
    mean = jacobian.mean(axis=0)
    mean_sq = mean @ mean
    variance = jacobian.var(axis=0, ddof=1).sum()
    off_diagonal = [
        jacobian[i] @ jacobian[j]
        for i in range(batch)
        for j in range(batch)
        if i != j
    ]
    unbiased_sq = float(np.mean(off_diagonal))
    projections = jacobian @ mean
    orthogonal = jacobian - np.outer(projections / mean_sq, mean)
    norms = np.linalg.norm(jacobian, axis=1)
    return {
        "batch_gradient_sq_norm": mean_sq,
        "example_gradient_sq_norm": float(np.mean(norms**2)),
        "gradient_variance": variance,
        "unbiased_gradient_sq_norm": unbiased_sq,
        "noise_scale": variance / unbiased_sq,
        "norm_test_ratio": variance / (batch * mean_sq),
        "inner_product_test_ratio": (
            projections.var(ddof=1) / (batch * mean_sq**2)
        ),
        "orthogonality_test_ratio": (
            orthogonal.var(axis=0, ddof=1).sum() / (batch * mean_sq)
        ),
        "example_gradient_norm_mean": norms.mean(),
        "example_gradient_norm_std": norms.std(),
        "example_gradient_norm_min": norms.min(),
        "example_gradient_norm_max": norms.max(),
    }


def as_floats(statistics):
    return {key: float(value) for key, value in statistics.items()}


def tiny_mlp():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3)(hidden)
    return keras.Model(inputs, outputs)


def loss_function():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def random_batch(size=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=size).astype(np.int32)
    return x, y


def test_statistics_match_random_gradients():
    rng = np.random.default_rng(3)
    # A shared mean direction plus noise, so |G|^2 is clearly positive.
    jacobian = rng.normal(size=(9, 40)) + 0.8 * rng.normal(size=40)
    result = as_floats(
        gradient_statistics.gradient_statistics(jacobian @ jacobian.T)
    )
    expected = direct_statistics(jacobian)
    assert tuple(result) == KEYS
    for key in KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key


def test_statistics_match_mlp_per_example_gradients():
    model = tiny_mlp()
    x, y = random_batch()
    jacobian = gram.per_example_gradients(model, loss_function(), x, y)
    matrix = gram.gram_matrix(model, loss_function(), x, y)
    result = as_floats(gradient_statistics.gradient_statistics(matrix))
    expected = direct_statistics(jacobian.numpy())
    for key in KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-4), key


def test_two_orthogonal_gradients_closed_form():
    # g1 = (1, 0), g2 = (0, 1): mean (0.5, 0.5), ‖ḡ‖² = 0.5, tr Σ̂ = 1,
    # |G|² = g1ᵀg2 = 0, so B_simple is undefined; a_i = 0.5 for both, so the
    # inner-product variance is 0; each orthogonal part has norm² 0.5.
    result = as_floats(gradient_statistics.gradient_statistics(np.eye(2)))
    assert result["batch_gradient_sq_norm"] == pytest.approx(0.5)
    assert result["example_gradient_sq_norm"] == pytest.approx(1.0)
    assert result["gradient_variance"] == pytest.approx(1.0)
    assert result["unbiased_gradient_sq_norm"] == pytest.approx(0.0)
    assert math.isnan(result["noise_scale"])
    assert result["norm_test_ratio"] == pytest.approx(1.0)
    assert result["inner_product_test_ratio"] == pytest.approx(0.0)
    assert result["orthogonality_test_ratio"] == pytest.approx(1.0)
    assert result["example_gradient_norm_std"] == pytest.approx(0.0)


def test_identical_gradients_have_no_noise():
    jacobian = np.tile([[3.0, 4.0]], (4, 1))
    result = as_floats(
        gradient_statistics.gradient_statistics(jacobian @ jacobian.T)
    )
    assert result["gradient_variance"] == pytest.approx(0.0, abs=1e-12)
    assert result["unbiased_gradient_sq_norm"] == pytest.approx(25.0)
    assert result["noise_scale"] == pytest.approx(0.0, abs=1e-12)
    assert result["norm_test_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert result["example_gradient_norm_min"] == pytest.approx(5.0)
    assert result["example_gradient_norm_max"] == pytest.approx(5.0)


def test_single_example_variances_are_nan():
    result = as_floats(gradient_statistics.gradient_statistics([[4.0]]))
    assert result["batch_gradient_sq_norm"] == pytest.approx(4.0)
    assert result["example_gradient_norm_mean"] == pytest.approx(2.0)
    for key in (
        "gradient_variance",
        "unbiased_gradient_sq_norm",
        "noise_scale",
        "norm_test_ratio",
        "inner_product_test_ratio",
        "orthogonality_test_ratio",
    ):
        assert math.isnan(result[key]), key


def test_zero_gradients_give_nan_ratios():
    zeros = np.zeros((3, 3))
    result = as_floats(gradient_statistics.gradient_statistics(zeros))
    assert result["batch_gradient_sq_norm"] == 0.0
    assert result["gradient_variance"] == 0.0
    for key in ("noise_scale", "norm_test_ratio", "inner_product_test_ratio"):
        assert math.isnan(result[key]), key


def test_cancelling_gradients_clamp_batch_norm():
    # g3 = −(g1 + g2), so 1ᵀF1 = ‖Σ g_i‖² = 0 exactly, but summing the Gram
    # matrix in float64 rounds it to a tiny negative number.
    first = np.array([[0.1, 0.1], [0.1, 0.3]])
    jacobian = np.concatenate([first, -first.sum(axis=0, keepdims=True)])
    assert np.all(jacobian.sum(axis=0) == 0.0)
    result = as_floats(
        gradient_statistics.gradient_statistics(jacobian @ jacobian.T)
    )
    # A squared norm: 0, not a negative round-off value.
    assert result["batch_gradient_sq_norm"] == 0.0
    for key in ("norm_test_ratio", "inner_product_test_ratio"):
        assert math.isnan(result[key]), key
    # tr Σ̂ = Σ‖g_i‖² / (B − 1) = (0.02 + 0.1 + 0.2) / 2 when ḡ = 0.
    assert result["gradient_variance"] == pytest.approx(0.16)


def test_batch_gradient_scales_with_positions():
    """With T loss values per example, an example's loss sums them while
    Keras divides by B·T: ḡ is T times the gradient of the compiled mean
    loss, so ‖ḡ‖² is T² times its squared norm."""
    batch, positions = 6, 5
    inputs = keras.Input((positions, 4))
    hidden = keras.layers.Dense(7, activation="tanh")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    rng = np.random.default_rng(8)
    x = rng.normal(size=(batch, positions, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(batch, positions)).astype(np.int32)
    matrix = gram.gram_matrix(network, loss_function(), x, y)
    result = as_floats(gradient_statistics.gradient_statistics(matrix))
    with tf.GradientTape() as tape:
        mean_loss = loss_function()(y, network(x, training=True))
    gradients = tape.gradient(mean_loss, network.trainable_variables)
    mean_sq_norm = sum(float(tf.reduce_sum(g**2)) for g in gradients)
    assert result["batch_gradient_sq_norm"] == pytest.approx(
        positions**2 * mean_sq_norm, rel=1e-5
    )


def test_statistics_in_compiled_function():
    jacobian = np.random.default_rng(5).normal(size=(5, 8)) + 1.0
    matrix = tf.constant(jacobian @ jacobian.T, tf.float32)
    compiled = tf.function(gradient_statistics.gradient_statistics)
    result = as_floats(compiled(matrix))
    expected = direct_statistics(jacobian)
    for key in KEYS:
        assert result[key] == pytest.approx(expected[key], rel=1e-4), key


def test_epoch_statistics_pool_noise_scale():
    rows = [
        {key: 1.0 for key in KEYS},
        {key: 3.0 for key in KEYS},
    ]
    rows[0].update(gradient_variance=10.0, unbiased_gradient_sq_norm=-1.0)
    rows[1].update(gradient_variance=30.0, unbiased_gradient_sq_norm=3.0)
    rows[1]["norm_test_ratio"] = math.nan
    result = gradient_statistics.epoch_statistics(rows)
    # Ratio of means (20 / 1), not the mean of the per-probe ratios.
    assert result["noise_scale"] == pytest.approx(20.0)
    assert result["batch_gradient_sq_norm"] == pytest.approx(2.0)
    # NaN values are left out of the mean.
    assert result["norm_test_ratio"] == pytest.approx(1.0)


def test_epoch_statistics_without_probes_are_nan():
    result = gradient_statistics.epoch_statistics([])
    assert tuple(sorted(result)) == tuple(sorted(KEYS))
    assert all(math.isnan(value) for value in result.values())


def test_probe_keys_include_gradient_statistics():
    assert measures.PROBE_KEYS[-len(KEYS) :] == KEYS
    result = measures.probe_statistics(tf.eye(3))
    assert tuple(result) == measures.PROBE_KEYS


def test_probe_in_training_step_matches_direct(tmp_path):
    network = tiny_mlp()
    x, y = random_batch(size=10, seed=4)
    # The probe runs before the update, on the weights the fit starts from.
    expected = direct_statistics(
        gram.per_example_gradients(network, loss_function(), x, y).numpy()
    )
    model = FisherModel(network, fisher_interval=1, weight_decay=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_function())
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    for key in KEYS:
        recorded = float(model.probe_values[key].numpy())
        assert recorded == pytest.approx(expected[key], rel=1e-4), key


def test_records_in_csv_logs_and_tensorboard(tmp_path):
    x, y = random_batch(size=24, seed=6)
    model = FisherModel(tiny_mlp(), fisher_interval=2)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_function())
    fisher = FisherCallback(str(tmp_path), str(tmp_path / "tb"))
    history = model.fit(
        x, y, batch_size=4, epochs=2, verbose=0, shuffle=False,
        callbacks=[fisher],
    )
    with open(tmp_path / "samples.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    for key in KEYS:
        assert key in rows[0], key
    # Epoch 2's log is the average of its three probes (rows 4 to 6).
    second = [float(row["batch_gradient_sq_norm"]) for row in rows[3:]]
    assert history.history["batch_gradient_sq_norm"][1] == pytest.approx(
        np.mean(second)
    )
    variance = np.mean([float(row["gradient_variance"]) for row in rows[3:]])
    signal = np.mean(
        [float(row["unbiased_gradient_sq_norm"]) for row in rows[3:]]
    )
    expected_scale = variance / signal if signal > 0 else math.nan
    assert history.history["noise_scale"][1] == pytest.approx(
        expected_scale, nan_ok=True
    )
    tags = event_tags(tmp_path / "tb")
    assert "batch_noise_scale" in tags
    assert "epoch_norm_test_ratio" in tags


def event_tags(folder):
    tags = set()
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(str(folder / name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_epoch_columns_hold_gradient_statistics():
    row = run._epoch_row(0, {"noise_scale": 12.5, "accuracy": 0.9})
    assert row["noise_scale"] == 12.5
    assert math.isnan(row["norm_test_ratio"])
    for key in KEYS:
        assert key in run.EPOCH_COLUMNS, key
