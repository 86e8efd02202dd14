"""Tests of the step learning-rate schedule: ×0.1 at 50% and 75% of epochs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_fisher import callbacks
from tf_fisher import schedules
from tf_fisher.model import FisherModel


def first_epochs_of_each_rate(num_epochs, base=0.1):
    """Return the 1-based epochs at which the rate changes, and the rates."""
    rates = [
        schedules.learning_rate_for_epoch(epoch, num_epochs, base)
        for epoch in range(num_epochs)
    ]
    changes = [
        epoch + 1 for epoch in range(1, num_epochs)
        if rates[epoch] != rates[epoch - 1]
    ]
    return changes, rates


@pytest.mark.parametrize(
    "num_epochs, drops",
    [(40, [21, 31]), (320, [161, 241])],
)
def test_drops_at_half_and_three_quarters(num_epochs, drops):
    changes, rates = first_epochs_of_each_rate(num_epochs)
    assert changes == drops
    first, second = drops
    assert rates[0] == 0.1
    assert rates[first - 2] == 0.1
    assert rates[first - 1] == pytest.approx(0.01, rel=1e-12)
    assert rates[second - 2] == pytest.approx(0.01, rel=1e-12)
    assert rates[second - 1] == pytest.approx(0.001, rel=1e-12)
    assert rates[-1] == pytest.approx(0.001, rel=1e-12)


@pytest.mark.parametrize(
    "num_epochs, expected",
    [
        (1, [1.0]),
        (2, [1.0, 0.1]),
        (3, [1.0, 1.0, 0.1]),
        (4, [1.0, 1.0, 0.1, 0.01]),
        (10, [1.0] * 5 + [0.1] * 3 + [0.01] * 2),
    ],
)
def test_drop_waits_for_completed_fraction(num_epochs, expected):
    # A drop applies from the first epoch that starts once at least 50%
    # (75%) of the epochs are complete: with 10 epochs, 7.5 epochs are
    # complete only when the 9th starts.
    _, rates = first_epochs_of_each_rate(num_epochs, base=1.0)
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "num_epochs, periods",
    [
        (40, [(0, 20), (20, 30), (30, 40)]),
        (320, [(0, 160), (160, 240), (240, 320)]),
        (10, [(0, 5), (5, 8), (8, 10)]),
    ],
)
def test_learning_rate_periods(num_epochs, periods):
    assert schedules.learning_rate_periods(num_epochs) == periods


class RateRecorder(keras.callbacks.Callback):
    """Records the optimizer's rate at each batch and a bias after each
    epoch."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias
        self.batch_rates = []
        self.biases = []

    def on_train_batch_begin(self, batch, logs=None):
        rate = self.model.optimizer.learning_rate
        self.batch_rates.append(float(keras.ops.convert_to_numpy(rate)))

    def on_epoch_end(self, epoch, logs=None):
        self.biases.append(float(self.bias.numpy()[0]))


def output_as_loss(y_true, y_pred):
    """Per-example loss equal to the output: its bias gradient is 1."""
    return y_pred[:, 0]


def bias_model(optimizer):
    """Return a FisherModel over one Dense unit of 2 inputs, compiled with
    `optimizer` and `output_as_loss`, and its Dense layer."""
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(1)
    model = FisherModel(keras.Model(inputs, dense(inputs)), fisher_interval=1)
    model.compile(optimizer=optimizer, loss=output_as_loss)
    return model, dense


# The one batch of two examples that the step-decay tests train on.
TWO_EXAMPLES = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)


def one_batch():
    return tf.data.Dataset.from_tensor_slices(
        (TWO_EXAMPLES, np.zeros(2))
    ).batch(2)


def test_step_decay_rate_reaches_optimizer():
    model, dense = bias_model(keras.optimizers.SGD(learning_rate=0.5))
    recorder = RateRecorder(dense.bias)
    fisher = callbacks.FisherCallback()
    decay = schedules.StepDecay(base_learning_rate=0.2, num_epochs=8)
    # Two fit calls, as two batch-size stages: the rate follows the epoch.
    model.fit(
        one_batch(), epochs=3, callbacks=[decay, recorder, fisher], verbose=0
    )
    model.fit(
        one_batch(), initial_epoch=3, epochs=8,
        callbacks=[decay, recorder, fisher], verbose=0,
    )

    expected = [0.2] * 4 + [0.02] * 2 + [0.002] * 2
    np.testing.assert_allclose(recorder.batch_rates, expected, rtol=1e-6)
    # Plain SGD with a unit bias gradient lowers the bias by the rate.
    steps = -np.diff([0.0] + recorder.biases)
    np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-6)
    # The sample rows carry the rate, and l_k = (α / B) sqrt(Tr F) uses it:
    # here J's column i is [x_i, 1], so Tr F = Σ_i (‖x_i‖² + 1).
    trace = float((TWO_EXAMPLES**2).sum() + 2)
    rows = fisher.samples
    assert [row["epoch"] for row in rows] == list(range(1, 9))
    np.testing.assert_allclose(
        [row["learning_rate"] for row in rows], expected, rtol=1e-6
    )
    np.testing.assert_allclose(
        [row["fisher_energy"] for row in rows],
        np.array(expected) / 2 * np.sqrt(trace),
        rtol=1e-5,
    )


def torch_nesterov_biases(rates, gradient=1.0, momentum=0.9):
    """Return the bias after each step of Torch's `optim.sgd` with Nesterov
    momentum, dampening 0 and a constant gradient, as a plain loop."""
    bias, velocity, biases = 0.0, 0.0, []
    for rate in rates:
        # Torch starts the velocity at the first gradient, which equals
        # momentum * 0 + gradient.
        velocity = momentum * velocity + gradient
        bias -= rate * (gradient + momentum * velocity)
        biases.append(bias)
    return biases


def test_step_decay_matches_torch_nesterov():
    # The authors trained with Torch's optim.sgd, whose velocity does not
    # include the rate. After a drop, the steps use the new rate only.
    model, dense = bias_model(
        keras.optimizers.SGD(learning_rate=0.2, momentum=0.9, nesterov=True)
    )
    recorder = RateRecorder(dense.bias)
    decay = schedules.StepDecay(base_learning_rate=0.2, num_epochs=8)
    # Two fit calls, as two batch-size stages. The momentum carries over.
    model.fit(one_batch(), epochs=5, callbacks=[decay, recorder], verbose=0)
    model.fit(
        one_batch(), initial_epoch=5, epochs=8,
        callbacks=[decay, recorder], verbose=0,
    )

    rates = [0.2] * 4 + [0.02] * 2 + [0.002] * 2
    np.testing.assert_allclose(recorder.batch_rates, rates, rtol=1e-6)
    # The bias gradient of the mean output is 1 at every step.
    np.testing.assert_allclose(
        recorder.biases, torch_nesterov_biases(rates), rtol=1e-5, atol=1e-6
    )


def test_step_decay_plain_sgd():
    model, _ = bias_model(keras.optimizers.SGD(learning_rate=0.2))
    x = np.ones((2, 2), np.float32)
    model.fit(x, np.zeros(2), batch_size=2, epochs=1, verbose=0)
    decay = schedules.StepDecay(base_learning_rate=0.2, num_epochs=2)
    decay.set_model(model)
    decay.on_epoch_begin(1)
    assert model.optimizer.momentums == []
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.02)
