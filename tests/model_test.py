"""Tests of FisherModel's training step and FisherCallback's records."""

import csv
import json
import math
import os
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from tf_fisher import callbacks
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher.model import FisherModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# Small enough that softmax regression on normalised digits does not fit a
# batch of four within a few steps (its gradients would then vanish).
LEARNING_RATE = 1e-3


def linear_network(input_shape, classes=10, seed=0):
    """Flatten and Dense logits: softmax regression."""
    inputs = keras.Input(input_shape)
    logits = keras.layers.Dense(
        classes, kernel_initializer=keras.initializers.GlorotNormal(seed)
    )(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, logits)


def conv_bn_network(input_shape, seed=0, first_layer=None):
    """Conv2D, BatchNormalization, ReLU, Dense logits, after `first_layer`
    when one is given."""
    inputs = keras.Input(input_shape)
    x = inputs if first_layer is None else first_layer(inputs)
    x = keras.layers.Conv2D(
        4, 3, strides=2, use_bias=False,
        kernel_initializer=keras.initializers.HeNormal(seed),
    )(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    logits = keras.layers.Dense(
        10, kernel_initializer=keras.initializers.GlorotNormal(seed + 1)
    )(keras.layers.Flatten()(x))
    return keras.Model(inputs, logits)


def compiled(network, learning_rate=LEARNING_RATE, momentum=0.0, **kwargs):
    model = FisherModel(network, **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate, momentum=momentum, nesterov=momentum > 0
        ),
        loss=LOSS,
        metrics=["accuracy"],
    )
    return model


def unshuffled(images, labels, batch_size):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(
        batch_size
    )


@pytest.fixture(scope="module")
def small_digits(digits):
    """The first 22 training digits: batches of 4 leave a last batch of 2."""
    return digits.train_images[:22], digits.train_labels[:22]


# Probe schedule.


@pytest.mark.parametrize("interval", [2, 5])
def test_probe_steps_restart_each_epoch(small_digits, interval):
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=interval)
    recorder = callbacks.FisherCallback()
    model.fit(
        unshuffled(images, labels, 4), epochs=3, callbacks=[recorder],
        verbose=0,
    )

    # Six steps per epoch: five of 4 examples, then one of 2.
    expected = [
        (6 * epoch + step + 1, epoch + 1, 2 if step == 5 else 4)
        for epoch in range(3)
        for step in range(6)
        if step % interval == 0
    ]
    actual = [
        (row["step"], row["epoch"], row["batch_size"])
        for row in recorder.samples
    ]
    assert actual == expected
    assert recorder.running.num_samples == len(expected)
    assert recorder.running.num_iterations == 18


def test_probe_steps_restart_with_callback_list(small_digits):
    """Keras' fit takes a CallbackList as well as a list, and the probes
    still restart each epoch, also when two fit calls share it."""
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=4)
    recorder = callbacks.FisherCallback()
    # Keras' fit returns the History of the list, so the list needs one.
    callback_list = keras.callbacks.CallbackList(
        [recorder], add_history=True, model=model
    )
    model.fit(
        unshuffled(images, labels, 4), epochs=2, callbacks=callback_list,
        verbose=0,
    )
    model.fit(
        unshuffled(images, labels, 4), epochs=3, initial_epoch=2,
        callbacks=callback_list, verbose=0,
    )
    # Six steps per epoch, probed at steps 1 and 5 of each.
    assert [row["step"] for row in recorder.samples] == [
        6 * epoch + step for epoch in range(3) for step in (1, 5)
    ]
    resets = [
        callback for callback in callback_list.callbacks
        if type(callback).__name__ == "_ResetProbeSchedule"
    ]
    assert len(resets) == 1


def test_probe_measures_batch_before_update(digits):
    images = digits.train_images[:16]
    labels = digits.train_labels[:16]
    network = conv_bn_network(images.shape[1:])
    saved = network.get_weights()
    model = compiled(network, learning_rate=0.5, fisher_interval=100)
    recorder = callbacks.FisherCallback()
    model.fit(
        unshuffled(images, labels, 16), epochs=1, callbacks=[recorder],
        verbose=0,
    )
    assert len(recorder.samples) == 1

    # The same weights, measured outside training.
    reference = conv_bn_network(images.shape[1:])
    reference.set_weights(saved)
    matrix = gram.gram_matrix(
        reference, LOSS, tf.constant(images), tf.constant(labels)
    )
    expected = {
        key: float(value)
        for key, value in measures.spectrum_statistics(matrix).items()
    }
    row = recorder.samples[0]
    for key in ("lambda_max", "lambda_min", "trace", "condition_number"):
        assert row[key] == pytest.approx(expected[key], rel=1e-4), key
        assert float(model.probe_values[key]) == row[key]
    assert row["rank"] == expected["rank"] == 16
    assert row["batch_size"] == 16
    assert row["learning_rate"] == pytest.approx(0.5)
    assert row["fisher_energy"] == pytest.approx(
        0.5 / 16 * math.sqrt(expected["trace"]), rel=1e-4
    )
    # The update did happen, and the network moved.
    moved = [
        not np.allclose(before, after)
        for before, after in zip(saved, network.get_weights(), strict=True)
    ]
    assert any(moved)


# The loss the update uses.


def dense_network(input_size, outputs, activation=None, seed=0):
    """Dense tanh hidden layer of 6 units, then `outputs` Dense outputs: a
    tensor, or a dict of them when `outputs` is a dict of sizes."""
    inputs = keras.Input((input_size,))
    hidden = keras.layers.Dense(
        6, activation="tanh",
        kernel_initializer=keras.initializers.GlorotNormal(seed),
    )(inputs)

    def head(units, name=None):
        return keras.layers.Dense(
            units, activation=activation, name=name,
            kernel_initializer=keras.initializers.GlorotNormal(seed + 1),
        )(hidden)

    if isinstance(outputs, dict):
        return keras.Model(
            inputs, {name: head(units, name) for name, units in outputs.items()}
        )
    return keras.Model(inputs, head(outputs))


def loop_gram(network, example_loss, x, y):
    """Jᵀ J in float64 from one GradientTape per example, with
    `example_loss(i, y_pred)` the loss of example i written out here."""
    weights = network.trainable_weights
    columns = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            value = example_loss(i, network(x[i : i + 1], training=True))
        columns.append(
            np.concatenate([
                np.asarray(gradient, np.float64).ravel()
                for gradient in tape.gradient(value, weights)
            ])
        )
    jacobian = np.stack(columns)
    return jacobian @ jacobian.T


def first_probe(network, loss, x, y, **fit_kwargs):
    """Compile, fit one probed step on the whole batch and return its
    `probe_values` as floats, with the weights set back to those the probe
    measured."""
    saved = network.get_weights()
    model = FisherModel(network, fisher_interval=100)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    model.fit(
        x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0,
        **fit_kwargs,
    )
    network.set_weights(saved)
    return model.read_probe_values()


def assert_probe_matches(probe, expected):
    """Compare a probe with numpy's measures of the reference matrix."""
    eigenvalues = np.linalg.eigvalsh(expected)
    assert probe["trace"] == pytest.approx(np.trace(expected), rel=1e-4)
    assert probe["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-4)
    assert probe["batch_gradient_sq_norm"] == pytest.approx(
        expected.sum() / len(expected) ** 2, rel=1e-4
    )


def vector_batch(size=8, features=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, features)).astype(np.float32)
    return x, rng.integers(0, 3, size=size).astype(np.int32)


@pytest.mark.parametrize("source", ["sample_weight", "class_weight"])
def test_gram_of_weighted_losses(source):
    """With example weights, column i of J is the gradient of the weighted
    loss of example i, the term the update sums."""
    x, y = vector_batch()
    network = dense_network(5, 3)
    class_weight = {0: 0.5, 1: 2.0, 2: 3.0}
    if source == "class_weight":
        weights = np.array([class_weight[label] for label in y])
        fit_kwargs = {"class_weight": class_weight}
    else:
        weights = np.linspace(0.25, 3.0, len(y)).astype(np.float32)
        fit_kwargs = {"sample_weight": weights}
    probe = first_probe(network, LOSS, x, y, **fit_kwargs)

    def example_loss(i, y_pred):
        value = keras.losses.sparse_categorical_crossentropy(
            y[i : i + 1], y_pred, from_logits=True
        )
        return float(weights[i]) * tf.reduce_sum(value)

    expected = loop_gram(network, example_loss, x, y)
    unweighted = loop_gram(
        network, lambda i, y_pred: example_loss(i, y_pred) / weights[i], x, y
    )
    assert np.trace(expected) != pytest.approx(np.trace(unweighted), rel=0.1)
    assert_probe_matches(probe, expected)


def squared_difference(y_true, y_pred):
    """A loss function of one value per output unit."""
    return tf.square(y_true - y_pred)


@pytest.mark.parametrize(
    "loss, activation, targets",
    [
        ("binary_crossentropy", "sigmoid", "binary"),
        ("crossentropy", "sigmoid", "binary"),
        (squared_difference, None, "real"),
        ("mse", None, "real"),
        (keras.losses.BinaryCrossentropy(from_logits=True), None, "binary"),
    ],
    ids=["bce-name", "crossentropy-name", "function", "mse-name", "bce"],
)
def test_one_output_losses_with_labels_of_rank_one(loss, activation, targets):
    """Labels `[batch]` for outputs `[batch, 1]`, which `compile` aligns
    for a loss given by name or as a function as well as for a Loss."""
    x, labels = vector_batch(seed=1)
    y = (labels % 2 if targets == "binary" else labels / 2).astype(np.float32)
    network = dense_network(5, 1, activation)
    probe = first_probe(network, loss, x, y)

    def example_loss(i, y_pred):
        p = y_pred[0, 0]
        if targets == "real":
            return tf.square(y[i] - p)
        if activation is None:
            p = tf.sigmoid(p)
        return -(y[i] * tf.math.log(p) + (1 - y[i]) * tf.math.log(1 - p))

    assert_probe_matches(probe, loop_gram(network, example_loss, x, y))


@pytest.mark.parametrize("container", ["dict", "list"])
def test_gram_of_model_with_several_outputs(container):
    """Outputs of different shapes, each with its loss and example weights:
    the loss of example i is the weighted sum of its outputs' losses."""
    x, labels = vector_batch(seed=2)
    targets = (labels / 2).astype(np.float32)
    network = dense_network(5, {"classes": 3, "value": 1})
    weights = np.linspace(0.5, 2.0, len(x)).astype(np.float32)
    if container == "dict":
        loss = {"classes": LOSS, "value": "mse"}
        y = {"classes": labels, "value": targets}
        loss_weights = {"classes": 1.0, "value": 0.5}
        sample_weight = {"classes": weights, "value": weights[::-1]}
    else:
        outputs = network.output
        network = keras.Model(
            network.input, [outputs["classes"], outputs["value"]]
        )
        loss = [LOSS, "mse"]
        y = [labels, targets]
        loss_weights = [1.0, 0.5]
        sample_weight = [weights, weights[::-1]]
    saved = network.get_weights()
    model = FisherModel(network, fisher_interval=100)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=loss,
        loss_weights=loss_weights,
    )
    history = model.fit(
        x, y, sample_weight=sample_weight, batch_size=len(x), epochs=1,
        verbose=0,
    )
    network.set_weights(saved)

    def example_loss(i, y_pred):
        if container == "list":
            y_pred = dict(zip(["classes", "value"], y_pred, strict=True))
        classes = keras.losses.sparse_categorical_crossentropy(
            labels[i : i + 1], y_pred["classes"], from_logits=True
        )
        value = tf.square(targets[i] - y_pred["value"][0, 0])
        return weights[i] * tf.reduce_sum(classes) + 0.5 * weights[
            ::-1
        ][i] * value

    expected = loop_gram(network, example_loss, x, labels)
    assert_probe_matches(model.read_probe_values(), expected)
    # The logged loss is the mean of the weighted example losses.
    losses = [float(example_loss(i, network(x[i : i + 1]))) for i in range(8)]
    assert history.history["loss"][0] == pytest.approx(
        np.mean(losses), rel=1e-5
    )


def test_schedule_rate_of_the_step():
    """l_k takes the rate that step k applied, not the next step's."""
    x, y = vector_batch(size=12)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [2], [0.1, 0.01]
    )
    model = FisherModel(dense_network(5, 3), fisher_interval=1)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=LOSS)
    recorder = callbacks.FisherCallback()
    model.fit(unshuffled(x, y, 2), epochs=1, callbacks=[recorder], verbose=0)

    # Steps 1 to 3 run at iterations 0 to 2, where the rate is 0.1.
    expected = [0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    rates = [row["learning_rate"] for row in recorder.samples]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    for row, rate in zip(recorder.samples, expected, strict=True):
        assert row["fisher_energy"] == pytest.approx(
            rate / 2 * math.sqrt(row["trace"]), rel=1e-6
        )


# The update.


def softmax_regression_gradient(kernel, bias, x, y):
    """Gradient of the mean cross-entropy of logits x W + b, in numpy."""
    logits = x @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    errors = (probabilities - np.eye(kernel.shape[1])[y]) / len(y)
    return x.T @ errors, errors.sum(axis=0)


def test_nesterov_update_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=10).astype(np.int32)
    network = linear_network((5,), classes=3)
    network.layers[-1].bias.assign([0.1, -0.2, 0.3])
    kernel, bias = (w.astype(np.float64) for w in network.get_weights())
    learning_rate, momentum, decay = 0.1, 0.9, 1e-2
    model = compiled(
        network, learning_rate, momentum, weight_decay=decay,
        fisher_interval=1,
    )
    model.fit(unshuffled(x, y, 6), epochs=1, verbose=0)

    # Keras 3 SGD, Nesterov: m <- μ m - α g; w <- w + μ m - α g, with
    # g = ∇(mean loss) + λ w (L2 regularisation).
    velocities = [np.zeros_like(kernel), np.zeros_like(bias)]
    for start in (0, 6):
        batch = slice(start, start + 6)
        gradients = softmax_regression_gradient(
            kernel, bias, x[batch].astype(np.float64), y[batch]
        )
        weights = [kernel, bias]
        for index, gradient in enumerate(gradients):
            gradient = gradient + decay * weights[index]
            velocities[index] = (
                momentum * velocities[index] - learning_rate * gradient
            )
            weights[index] = (
                weights[index]
                + momentum * velocities[index]
                - learning_rate * gradient
            )
        kernel, bias = weights

    trained_kernel, trained_bias = network.get_weights()
    np.testing.assert_allclose(trained_kernel, kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained_bias, bias, rtol=1e-5, atol=1e-6)


def test_weight_decay_is_kept_out_of_gram(small_digits):
    images, labels = small_digits
    probes = {}
    kernels = {}
    initial = None
    for decay in (0.0, 1e-2):
        network = linear_network(images.shape[1:], seed=3)
        initial = network.get_weights()[0]
        model = compiled(
            network, learning_rate=0.1, weight_decay=decay,
            fisher_interval=1,
        )
        model.fit(
            unshuffled(images[:8], labels[:8], 8), epochs=1, verbose=0
        )
        probes[decay] = {
            key: float(v) for key, v in model.probe_values.items()
        }
        kernels[decay] = network.get_weights()[0]

    assert probes[0.0]["trace"] > 0
    for key in measures.PROBE_KEYS:
        assert probes[1e-2][key] == pytest.approx(
            probes[0.0][key], rel=1e-6
        ), key
    # Plain SGD, one step: the decay moves w by -α λ w on top of the loss.
    np.testing.assert_allclose(
        kernels[1e-2] - kernels[0.0], -0.1 * 1e-2 * initial, atol=1e-7
    )


# Compilation.


class CountingFisherModel(FisherModel):
    """FisherModel that counts Python executions of `train_step`, which
    happen once per trace."""

    traces = 0

    def train_step(self, data):
        CountingFisherModel.traces += 1
        return super().train_step(data)


class TraceRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.counts = []

    def on_epoch_end(self, epoch, logs=None):
        self.counts.append(CountingFisherModel.traces)


def test_train_step_is_not_retraced(small_digits):
    images, labels = small_digits
    CountingFisherModel.traces = 0
    model = CountingFisherModel(
        linear_network(images.shape[1:]), fisher_interval=2
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOSS)
    recorder = TraceRecorder()
    model.fit(
        unshuffled(images, labels, 4), epochs=4, callbacks=[recorder],
        verbose=0,
    )
    # A second fit with another batch size, as a batch-size stage does, and
    # a third from NumPy arrays.
    model.fit(
        unshuffled(images, labels, 8), epochs=2, callbacks=[recorder],
        verbose=0,
    )
    model.fit(
        images, labels, batch_size=4, epochs=2, callbacks=[recorder],
        verbose=0,
    )
    assert len(recorder.counts) == 8
    # Batches carry an unknown batch dimension, so one trace serves full and
    # partial batches (Keras 3.15). A second trace is allowed in case a
    # Keras version traces the first batch's static size, but none may
    # follow the first epoch.
    assert recorder.counts[0] <= 2
    assert recorder.counts == [recorder.counts[0]] * 8


class XlaContextRecorder(keras.layers.Layer):
    """Identity layer that records, each time a step is traced, whether the
    trace is inside an XLA function."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.in_xla = []

    def call(self, inputs):
        # NOTE: a private function of TensorFlow 2.21, which TensorFlow's
        # own control flow code calls to detect XLA functions.
        self.in_xla.append(control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()
        ))
        return inputs


def test_probed_step_runs_without_xla(digits):
    images, labels = digits.train_images[:16], digits.train_labels[:16]
    runs = {}
    for jit_compile in (False, True):
        network = conv_bn_network(
            images.shape[1:], first_layer=XlaContextRecorder(name="recorder")
        )
        model = FisherModel(network, fisher_interval=2)
        model.compile(
            optimizer=keras.optimizers.SGD(
                LEARNING_RATE, momentum=0.9, nesterov=True
            ),
            loss=LOSS, jit_compile=jit_compile,
        )
        assert model.jit_compile is jit_compile
        # Drop the entry that building the network recorded.
        network.get_layer("recorder").in_xla.clear()
        recorder = callbacks.FisherCallback()
        model.fit(
            unshuffled(images, labels, 4), epochs=2, callbacks=[recorder],
            verbose=0,
        )
        # Four batches per epoch and N = 2: two probes in each epoch.
        assert [row["step"] for row in recorder.samples] == [1, 3, 5, 7]
        runs[jit_compile] = recorder.samples, network
    recorder_layer = runs[True][1].get_layer("recorder")
    # Traced for the plain step, in XLA, and for the probed step, outside.
    assert True in recorder_layer.in_xla
    assert False in recorder_layer.in_xla
    assert model.jit_compile is True
    for plain_row, xla_row in zip(*(runs[j][0] for j in (False, True))):
        # Training has not made the gradients vanish.
        assert plain_row["trace"] > 1.0
        for key in ("lambda_max", "lambda_min", "trace", "condition_number"):
            assert xla_row[key] == pytest.approx(plain_row[key], rel=1e-4)
    for plain_weight, xla_weight in zip(
        runs[False][1].get_weights(), runs[True][1].get_weights(), strict=True
    ):
        np.testing.assert_allclose(xla_weight, plain_weight, atol=1e-5)


def test_fit_keeps_jit_compile(small_digits):
    """Building the probed step leaves `jit_compile` as `compile` set it,
    as for a plain Keras model, even when the model would no longer pass
    Keras' XLA check."""
    images, labels = small_digits
    network = linear_network(images.shape[1:])
    model = FisherModel(network, fisher_interval=2)
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE), loss=LOSS,
        jit_compile=True,
    )
    # Keras checks each layer's `supports_jit` when `jit_compile` is set.
    network.layers[-1].supports_jit = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            unshuffled(images, labels, 4), epochs=1, verbose=0,
            callbacks=[callbacks.FisherCallback()],
        )
    assert model.jit_compile is True
    messages = [str(warning.message) for warning in caught]
    assert not any("jit_compile" in message for message in messages)


@pytest.mark.parametrize("float64_up_to", [0, 4096])
def test_probe_rank_at_most_parameters(monkeypatch, float64_up_to):
    """A one-unit head on a frozen base has 9 parameters, so at batch 32 the
    Gram matrix has rank 9. From float32 products (float64_up_to=0), the
    round-off leaves 23 eigenvalues near 1e-8 λ_max, above the default
    tolerance, and the P bound drops them. Either way c_k matches a float64
    per-example loop."""
    monkeypatch.setattr(
        gram, "FLOAT64_PRODUCTS_MAX_PARAMETERS", float64_up_to
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 20)).astype(np.float32)
    y = rng.integers(0, 2, (32, 1)).astype(np.float32)
    base = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(8, activation="relu")]
    )
    base.trainable = False
    inputs = keras.Input((20,))
    network = keras.Model(
        inputs, keras.layers.Dense(1, activation="sigmoid")(base(inputs))
    )
    columns = []
    for i in range(32):
        with tf.GradientTape() as tape:
            loss = keras.losses.binary_crossentropy(
                y[i : i + 1], network(x[i : i + 1], training=True)
            )
        gradients = tape.gradient(loss, network.trainable_variables)
        columns.append(np.concatenate(
            [np.asarray(g, np.float64).ravel() for g in gradients]
        ))
    jacobian = np.stack(columns)
    assert jacobian.shape == (32, 9)
    eigenvalues = np.linalg.eigvalsh(jacobian @ jacobian.T)[-9:]

    model = FisherModel(network, fisher_interval=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="bce")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    values = model.read_probe_values()
    assert values["rank"] == 9
    assert values["lambda_min"] == pytest.approx(eigenvalues[0], rel=1e-4)
    assert values["condition_number"] == pytest.approx(
        math.sqrt(eigenvalues[-1] / eigenvalues[0]), rel=1e-4
    )


def _softmax_head_jacobian(x, y, kernel, bias):
    """J of a Dense softmax head in float64, one row per example: the
    per-example gradient of cross-entropy, (p - onehot(y)) ⊗ [x, 1]."""
    logits = x.astype(np.float64) @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(len(y)), y] -= 1.0
    inputs = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return np.einsum("bi,bj->bij", inputs, probabilities).reshape(len(x), -1)


def test_probe_rank_of_softmax_head():
    """A Dense(10) head on 15 features has P = 160, but softmax gradients
    sum to zero over the classes, so J has rank (15 + 1) * 9 = 144 at batch
    256. The probe counts 144 and its c_k matches a float64 J; from float32
    products it counted 160 with c_k near 8,000 instead of 9.4."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 15)).astype(np.float32)
    y = rng.integers(0, 10, size=256).astype(np.int32)
    inputs = keras.Input((15,))
    network = keras.Model(inputs, keras.layers.Dense(10)(inputs))
    kernel, bias = (np.asarray(w, np.float64) for w in network.weights)
    jacobian = _softmax_head_jacobian(x, y, kernel, bias)
    eigenvalues = np.linalg.eigvalsh(jacobian @ jacobian.T)
    assert np.linalg.matrix_rank(jacobian) == 144
    assert gram.product_dtype(160) == tf.float64

    model = FisherModel(network, fisher_interval=1)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=256, epochs=1, verbose=0, shuffle=False)
    values = model.read_probe_values()
    assert values["rank"] == 144
    assert values["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-5)
    assert values["lambda_min"] == pytest.approx(eigenvalues[-144], rel=1e-4)
    assert values["condition_number"] == pytest.approx(
        math.sqrt(eigenvalues[-1] / eigenvalues[-144]), rel=1e-4
    )

    matrix = gram.gram_matrix(
        network, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        x, y,
    ).numpy()
    ranked = measures.spectrum_statistics(tf.constant(matrix), max_rank=160)
    assert float(ranked["rank"]) == 144


def test_batch_near_parameters_warns_once():
    """Above `FLOAT64_PRODUCTS_MAX_PARAMETERS` the products are float32, and
    a batch of at least P / 4 examples gets one warning that names the
    tolerance to pass."""
    assert gram.product_dtype(gram.FLOAT64_PRODUCTS_MAX_PARAMETERS) == (
        tf.float64
    )
    assert gram.product_dtype(gram.FLOAT64_PRODUCTS_MAX_PARAMETERS + 1) == (
        tf.float32
    )
    assert gram.product_dtype(768_010) == tf.float32

    rng = np.random.default_rng(1)
    # Dense(10) on 511 features: P = 5,120, so batches of 1,280 warn.
    x = rng.normal(size=(2 * 1280, 511)).astype(np.float32)
    y = rng.integers(0, 10, size=len(x)).astype(np.int32)
    inputs = keras.Input((511,))
    network = keras.Model(inputs, keras.layers.Dense(10)(inputs))
    model = FisherModel(network, fisher_interval=1)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, batch_size=1280, epochs=1, verbose=0,
            callbacks=[callbacks.FisherCallback()],
        )
    messages = [
        str(w.message) for w in caught if "independent columns" in str(w.message)
    ]
    assert len(messages) == 1
    assert "1280 examples" in messages[0]
    assert "5120 trainable parameters" in messages[0]
    assert "eigenvalue_tolerance=1e-7" in messages[0]
    assert gram.rank_warning(5120, 1279, tf.float32) is None
    assert gram.rank_warning(160, 256, tf.float64) is None


# FisherCallback.


def test_callback_rows_csv_and_epoch_logs(small_digits, tmp_path):
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=3)
    recorder = callbacks.FisherCallback(output_dir=str(tmp_path))
    history = model.fit(
        unshuffled(images, labels, 4), epochs=2, callbacks=[recorder],
        verbose=0,
    )

    with open(tmp_path / "samples.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == callbacks.SAMPLE_COLUMNS
        rows = list(reader)
    assert len(rows) == len(recorder.samples) == 4
    for written, sample in zip(rows, recorder.samples, strict=True):
        for key in callbacks.SAMPLE_COLUMNS:
            assert float(written[key]) == pytest.approx(
                sample[key], nan_ok=True
            ), key

    # Each row's running values, recomputed from the rows so far.
    iterations_at_end = {1: 6, 2: 12}
    for index, row in enumerate(recorder.samples):
        so_far = recorder.samples[: index + 1]
        assert row["mean_condition_number"] == pytest.approx(
            np.nanmean([r["condition_number"] for r in so_far])
        )
        energy = sum(r["fisher_energy"] for r in so_far)
        assert row["cumulative_fisher_energy"] == pytest.approx(
            energy * row["step"] / len(so_far)
        )
        assert row["fisher_energy"] == pytest.approx(
            LEARNING_RATE / row["batch_size"] * math.sqrt(row["trace"])
        )
        assert row["learning_rate"] == pytest.approx(LEARNING_RATE)

    for epoch in (1, 2):
        so_far = [r for r in recorder.samples if r["epoch"] <= epoch]
        assert history.history["mean_condition_number"][
            epoch - 1
        ] == pytest.approx(np.nanmean([r["condition_number"] for r in so_far]))
        energy = sum(r["fisher_energy"] for r in so_far)
        assert history.history["cumulative_fisher_energy"][
            epoch - 1
        ] == pytest.approx(energy * iterations_at_end[epoch] / len(so_far))


def test_callback_accumulates_across_fit_calls(small_digits):
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    recorder = callbacks.FisherCallback()
    model.fit(
        unshuffled(images, labels, 4), epochs=1, callbacks=[recorder],
        verbose=0,
    )
    model.fit(
        unshuffled(images, labels, 8), initial_epoch=1, epochs=2,
        callbacks=[recorder], verbose=0,
    )
    # Epoch 1: 6 steps (4, 4, 4, 4, 4, 2); epoch 2: 3 steps (8, 8, 6).
    actual = [
        (row["step"], row["epoch"], row["batch_size"])
        for row in recorder.samples
    ]
    assert actual == [(1, 1, 4), (3, 1, 4), (5, 1, 4), (7, 2, 8), (9, 2, 6)]
    assert recorder.running.num_iterations == 9


@pytest.mark.parametrize("argument", ["output_dir", "tensorboard_dir"])
def test_callback_rejects_file_as_folder(tmp_path, argument):
    path = tmp_path / "a_file"
    path.write_text("kept")
    with pytest.raises(ValueError) as error:
        callbacks.FisherCallback(**{argument: str(path)})
    assert f"{argument}={str(path)!r} is a file" in str(error.value)
    assert path.read_text() == "kept"
    with pytest.raises(TypeError, match=f"Received: {argument}=123."):
        callbacks.FisherCallback(**{argument: 123})


def test_callback_unwritable_csv_stops_before_training(small_digits,
                                                        tmp_path):
    """A samples.csv that cannot be opened fails `fit` before its first
    step, rather than at the first probe."""
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=3)
    (tmp_path / "samples.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="samples.csv"):
        model.fit(
            unshuffled(images, labels, 4), epochs=1, verbose=0,
            callbacks=[callbacks.FisherCallback(output_dir=str(tmp_path))],
        )
    assert int(model.optimizer.iterations.numpy()) == 0


@pytest.mark.parametrize("verbose", [True, False])
def test_callback_says_why_it_stopped(small_digits, capsys, verbose):
    """A NaN input makes the first probed trace NaN: training stops after
    that step, with a line saying why unless verbose is off."""
    images, labels = small_digits
    images = images.copy()
    images[0, 0] = np.nan
    model = compiled(linear_network(images.shape[1:]), fisher_interval=3)
    recorder = callbacks.FisherCallback(verbose=verbose)
    model.fit(
        unshuffled(images, labels, 4), epochs=2, verbose=0,
        callbacks=[recorder],
    )
    assert int(model.optimizer.iterations.numpy()) == 1
    assert recorder.diverged_at == "the Gram trace is nan at step 1 (epoch 1)"
    expected = (
        "FisherCallback stopped training: the Gram trace is nan at step 1 "
        "(epoch 1). Lower the learning rate, or pass "
        "stop_on_divergence=False to train on.\n"
    )
    assert capsys.readouterr().out == (expected if verbose else "")


class StopAt(keras.callbacks.Callback):
    """Raises, as a crash would, before step `batch` of epoch `epoch`, or at
    the end of that epoch when `batch` is None."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self._current = None

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._current, batch) == (self.epoch, self.batch):
            raise RuntimeError("stopped")

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None and epoch == self.epoch:
            raise RuntimeError("stopped")


def read_samples(folder, name="samples.csv"):
    with open(folder / name, newline="") as file:
        return list(csv.DictReader(file))


def stop_and_resume(images, labels, folder, stop, **callback_arguments):
    """Train 4 epochs with BackupAndRestore until `stop` raises, then train
    again with a new model and callback, and return that callback and its
    history.

    `stop` comes after the FisherCallback and before the backup, so it can
    raise after the callback has saved an epoch that the backup has not.
    """
    data = unshuffled(images, labels, 4)
    backup = keras.callbacks.BackupAndRestore(str(folder / "backup"))
    model = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    with pytest.raises(RuntimeError, match="stopped"):
        model.fit(
            data, epochs=4, verbose=0,
            callbacks=[
                callbacks.FisherCallback(str(folder), **callback_arguments),
                stop, backup,
            ],
        )
    model = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    recorder = callbacks.FisherCallback(str(folder), **callback_arguments)
    history = model.fit(
        data, epochs=4, verbose=0, callbacks=[recorder, backup],
    ).history
    return recorder, history


@pytest.mark.parametrize(
    "epoch, batch", [(2, 3), (1, None), (0, 0)],
    ids=["third_epoch", "second_epoch_end", "first_step"],
)
def test_callback_continues_after_backup_and_restore(small_digits, tmp_path,
                                                     epoch, batch):
    """A run stopped and resumed by BackupAndRestore with a new callback
    records what an uninterrupted run records. Stopped at the end of the
    second epoch, after the callback saved its state but before the backup
    was written, training resumes at the second epoch."""
    images, labels = small_digits
    whole_folder = tmp_path / "whole"
    whole = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    expected = whole.fit(
        unshuffled(images, labels, 4), epochs=4, verbose=0,
        callbacks=[callbacks.FisherCallback(str(whole_folder))],
    ).history
    folder = tmp_path / "resumed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder, history = stop_and_resume(
            images, labels, folder, StopAt(epoch, batch)
        )
    assert not [
        warning for warning in caught
        if "FisherCallback" in str(warning.message)
    ]

    resumed_rows = read_samples(folder)
    whole_rows = read_samples(whole_folder)
    assert len(resumed_rows) == len(whole_rows) == 12
    for resumed, uninterrupted in zip(resumed_rows, whole_rows, strict=True):
        for key in ("step", "epoch", "batch_size", "rank"):
            assert resumed[key] == uninterrupted[key]
        for key in ("trace", "condition_number", "cumulative_fisher_energy"):
            assert float(resumed[key]) == pytest.approx(
                float(uninterrupted[key]), rel=1e-5
            )
    assert [row["step"] for row in recorder.samples] == [
        int(row["step"]) for row in whole_rows
    ]
    # History covers the epochs of the second fit only, as Keras gives it.
    first = 4 - len(history["loss"])
    for key in ("mean_condition_number", "cumulative_fisher_energy"):
        assert history[key] == pytest.approx(expected[key][first:], rel=1e-5)
    assert recorder.running.num_iterations == 24


@pytest.mark.parametrize("damage", ["no_state", "short_csv", "bad_value"])
def test_callback_keeps_rows_it_cannot_continue(small_digits, tmp_path,
                                                damage):
    """Records damaged at the end of the second epoch, before the backup:
    training resumes at the second epoch, and the callback warns why it
    cannot continue, keeps the earlier rows in samples.csv.bak and starts
    the measures again."""
    images, labels = small_digits
    path = tmp_path / "samples.csv"
    state_path = tmp_path / callbacks.STATE_FILE

    class Damage(StopAt):
        def on_epoch_end(self, epoch, logs=None):
            if epoch != self.epoch:
                return
            if damage == "no_state":
                os.remove(state_path)
            lines = path.read_text().splitlines(keepends=True)
            if damage == "short_csv":
                lines = lines[:3]
            elif damage == "bad_value":
                lines[2] = lines[2].replace(",", ",abc", 1)
            path.write_text("".join(lines))
            raise RuntimeError("stopped")

    expected = {
        "no_state": f"{state_path} is missing.",
        "short_csv": f"{path} contains 2 rows, but {state_path} records 3 "
                     "after epoch 1.",
        "bad_value": f"row 2 of {path} has 'abc",
    }[damage]
    with pytest.warns(UserWarning) as caught:
        recorder, _ = stop_and_resume(
            images, labels, tmp_path, Damage(1, None)
        )
    (message,) = [
        str(warning.message) for warning in caught
        if "FisherCallback" in str(warning.message)
    ]
    assert message.startswith(
        f"FisherCallback cannot continue the run recorded in {tmp_path} at "
        f"epoch 2: {expected}"
    )
    assert f"The earlier rows are kept in {path}.bak." in message
    assert len(read_samples(tmp_path, "samples.csv.bak")) == (
        2 if damage == "short_csv" else 6
    )
    rows = read_samples(tmp_path)
    assert [(row["step"], row["epoch"]) for row in rows] == [
        (str(step), str(2 + index // 3))
        for index, step in enumerate(range(1, 18, 2))
    ]
    assert recorder.running.num_iterations == 18


def test_callback_continues_at_earlier_epoch(small_digits, tmp_path):
    """`initial_epoch` before the last recorded epoch continues from the
    records of that epoch and replaces those of the later ones."""
    images, labels = small_digits
    data = unshuffled(images, labels, 4)
    model = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    first = callbacks.FisherCallback(str(tmp_path))
    model.fit(data, epochs=3, verbose=0, callbacks=[first])
    after_one_epoch = first.samples[2]["cumulative_fisher_energy"]
    recorder = callbacks.FisherCallback(str(tmp_path), verbose=False)
    model.fit(
        data, initial_epoch=1, epochs=2, verbose=0, callbacks=[recorder]
    )
    rows = read_samples(tmp_path)
    assert [(row["step"], row["epoch"]) for row in rows] == [
        ("1", "1"), ("3", "1"), ("5", "1"), ("7", "2"), ("9", "2"),
        ("11", "2"),
    ]
    assert float(rows[2]["cumulative_fisher_energy"]) == pytest.approx(
        after_one_epoch
    )
    with open(tmp_path / callbacks.STATE_FILE) as file:
        state = json.load(file)
    assert [entry["epoch"] for entry in state["epochs"]] == [1, 2]
    assert [entry["samples"] for entry in state["epochs"]] == [3, 6]


def test_callback_without_folder_warns_when_started_late(small_digits):
    images, labels = small_digits
    model = compiled(linear_network(images.shape[1:]), fisher_interval=2)
    with pytest.warns(UserWarning, match="starts C̄_K and L_K again at "
                      "epoch 3: without an output_dir"):
        model.fit(
            unshuffled(images, labels, 4), initial_epoch=2, epochs=3,
            verbose=0, callbacks=[callbacks.FisherCallback()],
        )


def test_callback_rejects_plain_keras_model(small_digits):
    images, labels = small_digits
    network = linear_network(images.shape[1:])
    network.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match="FisherModel"):
        network.fit(
            unshuffled(images, labels, 4), epochs=1, verbose=0,
            callbacks=[callbacks.FisherCallback()],
        )


def test_learning_rate_of_variable_and_schedule():
    optimizer = keras.optimizers.SGD(0.25)
    scheduled = keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    )
    scheduled.iterations.assign(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callbacks.current_learning_rate(optimizer) == 0.25
        assert callbacks.current_learning_rate(scheduled) == pytest.approx(
            0.05
        )


# Argument checks.


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"fisher_interval": 0}, "fisher_interval=0"),
        ({"fisher_interval": 2.5}, "fisher_interval=2.5"),
        ({"eigenvalue_tolerance": 1.0}, "eigenvalue_tolerance=1.0"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
        ({"weight_decay": math.nan}, "weight_decay=nan"),
        ({"eigenvalue_tolerance": "1e-9"}, "eigenvalue_tolerance='1e-9'"),
        ({"eigenvalue_tolerance": None}, "eigenvalue_tolerance=None"),
        ({"weight_decay": True}, "weight_decay=True"),
        ({"weight_decay": [1e-4]}, r"weight_decay=\[0.0001\]"),
        ({"gram_method": "exact"}, "gram_method='exact'"),
        ({"block_overlap": -1}, "block_overlap=-1"),
        ({"block_overlap": 1.5}, "block_overlap=1.5"),
        ({"block_overlap": True}, "block_overlap=True"),
        ({"block_overlap": "2"}, "block_overlap='2'"),
    ],
)
def test_fisher_model_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FisherModel(linear_network((3,)), **kwargs)


def test_fisher_model_takes_numpy_integers():
    """NumPy integers, as a grid built with NumPy gives them, are stored as
    Python ints, which the model's config saves as JSON."""
    model = FisherModel(
        linear_network((3,)), fisher_interval=np.int64(10),
        block_overlap=np.int32(1),
    )
    assert type(model.fisher_interval) is int
    assert model.fisher_interval == 10
    assert type(model.block_overlap) is int
    assert model.block_overlap == 1
    with pytest.raises(ValueError, match="fisher_interval=np.int64"):
        FisherModel(linear_network((3,)), fisher_interval=np.int64(0))


def test_fisher_model_rejects_summed_loss():
    model = FisherModel(linear_network((3,)))
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"
    )
    with pytest.raises(ValueError, match="reduction='sum'"):
        model.compile(optimizer="sgd", loss=loss)


@pytest.mark.parametrize("container", [dict, list])
def test_fisher_model_rejects_summed_loss_of_one_output(container):
    model = FisherModel(dense_network(5, {"classes": 3, "value": 1}))
    losses = [LOSS, keras.losses.MeanSquaredError(reduction="sum")]
    if container is dict:
        losses = dict(zip(["classes", "value"], losses, strict=True))
    with pytest.raises(
        ValueError, match="reduction='sum' in loss 'mean_squared_error'"
    ):
        model.compile(optimizer="sgd", loss=losses)


def test_fisher_model_takes_mean_reduction():
    """Keras reduces "mean" as "sum_over_batch_size", so the Gram matrix
    is the same."""
    x, y = vector_batch()
    probes = [
        first_probe(
            dense_network(5, 3),
            keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=reduction
            ),
            x, y,
        )
        for reduction in ("sum_over_batch_size", "mean")
    ]
    assert probes[0]["trace"] > 0
    assert probes[1]["trace"] == pytest.approx(probes[0]["trace"], rel=1e-6)


def test_fisher_model_rejects_steps_per_execution():
    model = FisherModel(linear_network((3,)))
    with pytest.raises(ValueError, match="steps_per_execution=4"):
        model.compile(optimizer="sgd", loss=LOSS, steps_per_execution=4)


def test_fisher_model_rejects_loss_scale_optimizer():
    model = FisherModel(linear_network((3,)))
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1)
    )
    with pytest.raises(TypeError, match="loss scaling"):
        model.compile(optimizer=optimizer, loss=LOSS)
    assert not model.compiled
    with pytest.raises(TypeError, match="loss scaling"):
        model.compile(optimizer, LOSS)


def test_fisher_model_rejects_mixed_float16_policy():
    """The mixed_float16 policy makes compile add a LossScaleOptimizer."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = FisherModel(linear_network((3,)))
        with pytest.raises(TypeError, match="'mixed_float16'"):
            model.compile(optimizer="sgd", loss=LOSS)
        # Without loss scaling the model compiles.
        model.compile(optimizer="sgd", loss=LOSS, auto_scale_loss=False)
    finally:
        keras.config.set_dtype_policy(previous)


def test_fisher_model_rejects_two_replicas():
    """Under a MirroredStrategy over two CPU devices each replica would see
    half the batch; compile refuses. One device trains."""
    script = """
import keras, numpy as np, tensorflow as tf
from tf_fisher.model import FisherModel
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
devices = [device.name for device in tf.config.list_logical_devices("CPU")]

def build():
    inputs = keras.Input((3,))
    return FisherModel(keras.Model(inputs, keras.layers.Dense(2)(inputs)))

with tf.distribute.MirroredStrategy(devices).scope():
    model = build()
    try:
        model.compile(optimizer="sgd", loss="mse")
    except ValueError as error:
        print("rejected:", error)
    print("compiled:", model.compiled)
with tf.distribute.OneDeviceStrategy(devices[0]).scope():
    model = build()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, verbose=0)
    print("one device trained:", int(model.optimizer.iterations.numpy()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True,
        text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "rejected: FisherModel measures the Gram matrix of a whole batch, "
        "so it trains on one device. Received: a MirroredStrategy with 2 "
        "replicas."
    )
    assert lines[1:] == ["compiled: False", "one device trained: 2"]


def test_fisher_model_rejects_non_model():
    with pytest.raises(TypeError, match="Dense"):
        FisherModel(keras.layers.Dense(3))


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
def test_fisher_model_rejects_activity_regularizer(nested):
    """The penalty's gradient would reach the layers before the regularized
    one, in a nested model too."""
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(
        5, activity_regularizer="l2", name="penalized"
    )(keras.layers.Dense(5)(inputs))
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    if nested:
        outer_inputs = keras.Input((4,))
        network = keras.Model(outer_inputs, network(outer_inputs))
    with pytest.raises(ValueError, match="'penalized' .*activity_regularizer"):
        FisherModel(network)


def test_saved_model_loads_and_probes_alike(small_digits, tmp_path):
    """A FisherModel saved in the .keras format loads with its arguments,
    weights and optimizer state, and its next probe records the same
    values as the original's on the same batch."""
    images, labels = small_digits
    model = compiled(
        conv_bn_network(images.shape[1:]), momentum=0.9, fisher_interval=3,
        eigenvalue_tolerance=1e-7, weight_decay=1e-4, gram_method="tape",
        block_overlap=1,
    )
    model.fit(unshuffled(images, labels, 4), epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.models.load_model(path)

    assert isinstance(loaded, FisherModel)
    for name in (
        "fisher_interval", "eigenvalue_tolerance", "weight_decay",
        "gram_method", "block_overlap",
    ):
        assert getattr(loaded, name) == getattr(model, name), name
    assert loaded.compiled
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(
        model.optimizer.variables, loaded.optimizer.variables
    ):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())

    batch = unshuffled(images[:8], labels[:8], 8)
    for fisher_model in (model, loaded):
        fisher_model.fisher_interval = 1
        fisher_model.fit(batch, epochs=1, verbose=0)
    expected, actual = model.read_probe_values(), loaded.read_probe_values()
    for key in ("trace", "lambda_max", "condition_number"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-6), key
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(
            restored.numpy(), saved.numpy(), rtol=1e-6, atol=1e-7
        )

    # Another process finds the class once it has imported tf_fisher.
    script = (
        "import keras, tf_fisher\n"
        f"print(type(keras.models.load_model({path!r})).__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True,
        text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "FisherModel"


def test_file_without_block_overlap_loads(small_digits, tmp_path):
    """A .keras file saved before `block_overlap` was an argument, whose
    config lacks the key, loads with the default overlap."""
    images, _ = small_digits
    model = compiled(conv_bn_network(images.shape[1:]), block_overlap=0)
    path = tmp_path / "model.keras"
    model.save(path)
    old_path = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(
        old_path, "w"
    ) as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                del config["config"]["block_overlap"]
                content = json.dumps(config).encode()
            target.writestr(item, content)

    loaded = keras.models.load_model(old_path)

    assert isinstance(loaded, FisherModel)
    assert loaded.block_overlap == gram.DEFAULT_BLOCK_OVERLAP
