"""Tests of the Gram matrix on user models beyond the package's own layers.

Each model is built from standard Keras layers, Keras operations or small
layer classes a user might write. Each test checks `gram_matrix` and the
probe of a `fit` step against J Jᵀ from one tape per example, to a relative
1e-4 of the largest entry, or checks that an unsupported case raises an
error that names it.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.gram_paths_test import LOSS
from tests.gram_paths_test import RTOL
from tests.gram_paths_test import assert_gram_close
from tests.gram_paths_test import random_batch
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher.model import FisherModel


def single_example_gram(network, x, y, padding_mask=False):
    """J Jᵀ in float64, from one tape per example, J `[batch, P]`.

    The loss of an example is the sum of its loss values; with
    `padding_mask`, only over its nonzero input tokens.
    """
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            logits = network(x[i : i + 1], training=True)
            values = LOSS.call(y[i : i + 1], logits)
            if padding_mask:
                values *= tf.cast(x[i : i + 1] != 0, values.dtype)
            loss = tf.reduce_sum(values)
        gradients = tape.gradient(loss, network.trainable_weights)
        rows.append(
            np.concatenate(
                # Embedding gradients are IndexedSlices.
                [np.ravel(tf.convert_to_tensor(g)) for g in gradients]
            )
        )
    jacobian = np.stack(rows).astype(np.float64)
    return jacobian @ jacobian.T


def probe_of_fit(network, x, y):
    """Run one probed `fit` step on the whole batch, without an update, and
    return the recorded measures."""
    model = FisherModel(network, fisher_interval=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=len(y), epochs=1, verbose=0, shuffle=False)
    return model.read_probe_values()


def assert_probe_matches(recorded, expected_gram):
    expected = measures.spectrum_statistics(tf.constant(expected_gram))
    for key in ("trace", "lambda_max", "lambda_min"):
        assert recorded[key] == pytest.approx(
            float(expected[key]), rel=RTOL
        ), key


def assert_gram_and_probe_match(network, x, y, expected=None):
    if expected is None:
        expected = single_example_gram(network, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_gram_close(gram.gram_matrix(network, LOSS, x, y), expected)
    assert_probe_matches(probe_of_fit(network, x, y), expected)


# Keras operations between layers.


def test_keras_operations_between_layers_match_loop():
    """`inputs * 2.0` and `keras.ops.tanh(h) + 1.0` in a Functional model
    are graph operations without weights, not layers."""
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs * 2.0)
    hidden = keras.ops.tanh(hidden) + 1.0
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((6,), 5, 3, seed=1)
    assert_gram_and_probe_match(network, x, y)


# Subclasses of the closed-form layers.


class DoubledInputDense(keras.layers.Dense):
    """A Dense whose call is not the affine map of its input."""

    def call(self, inputs, training=None):
        return super().call(inputs * 2.0) + 1.0


class WeightNormDense(keras.layers.Dense):
    """A Dense with a kernel normalised per output unit."""

    def call(self, inputs, training=None):
        kernel = self.kernel / tf.norm(self.kernel, axis=0, keepdims=True)
        return self.activation(tf.matmul(inputs, kernel) + self.bias)


class SquaredInputConv2D(keras.layers.Conv2D):
    def call(self, inputs):
        return super().call(tf.square(inputs))


class NamedDense(keras.layers.Dense):
    """A subclass that keeps the forward pass of Dense."""


@pytest.mark.parametrize(
    "build, input_shape",
    [
        (lambda: DoubledInputDense(4), (6,)),
        (lambda: WeightNormDense(4, activation="relu"), (6,)),
        (lambda: SquaredInputConv2D(2, 3), (5, 5, 2)),
    ],
    ids=["doubled_input", "weight_norm", "squared_input_conv"],
)
def test_subclass_with_own_call_falls_back(build, input_shape, monkeypatch):
    """The closed forms of Dense and Conv2D assume their forward pass; a
    subclass that changes it gets the per-example tape and its warning."""
    monkeypatch.setattr(gram, "_warned_layer_classes", set())
    inputs = keras.Input(input_shape)
    layer = build()
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(layer(inputs)))
    network = keras.Model(inputs, logits)
    x, y = random_batch(input_shape, 5, 3, seed=2)
    expected = single_example_gram(network, x, y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = gram.gram_matrix(network, LOSS, x, y)
    messages = [str(w.message) for w in caught if "tf_fisher" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"class {type(layer).__name__} " in messages[0]
    assert_gram_close(actual, expected)
    assert_probe_matches(probe_of_fit(network, x, y), expected)


def test_subclass_keeping_forward_pass_uses_closed_form(monkeypatch):
    pairwise_calls = []
    pairwise = gram._pairwise_gram

    def counting_pairwise(*args):
        pairwise_calls.append(args)
        return pairwise(*args)

    monkeypatch.setattr(gram, "_pairwise_gram", counting_pairwise)
    inputs = keras.Input((2, 40))
    hidden = NamedDense(40, activation="tanh")(inputs)
    network = keras.Model(
        inputs, keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    )
    x, y = random_batch((2, 40), 5, 3, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = gram.gram_matrix(network, LOSS, x, y)
    assert_gram_close(actual, single_example_gram(network, x, y))
    assert pairwise_calls


def test_batch_norm_subclass_with_own_call_is_rejected():
    class ShiftedBatchNormalization(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return super().call(inputs + 1.0, training=training)

    inputs = keras.Input((4,))
    hidden = ShiftedBatchNormalization()(keras.layers.Dense(4)(inputs))
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((4,), 5, 3, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            NotImplementedError, match="ShiftedBatchNormalization subclasses"
        ):
            gram.gram_matrix(network, LOSS, x, y)


# Fallback layers that take more than their first argument.


class Bilinear(keras.layers.Layer):
    """b_iᵀ W a_i for two inputs a and b: a layer of two arguments."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, first_shape, second_shape):
        self.kernel = self.add_weight(
            shape=(first_shape[-1], second_shape[-1], self.units),
            initializer="glorot_uniform",
        )

    def call(self, first, second):
        return tf.einsum("bi,ijk,bj->bk", first, self.kernel, second)


def test_layer_with_two_inputs_matches_loop():
    inputs = keras.Input((5,))
    first = keras.layers.Dense(4, activation="tanh")(inputs)
    second = keras.layers.Dense(3, activation="relu")(inputs)
    hidden = Bilinear(4)(first, second)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((5,), 6, 3, seed=5)
    assert_gram_and_probe_match(network, x, y)


def masked_tokens():
    """Token ids with trailing padding (0), and one label per sequence."""
    x = tf.constant(
        [[4, 3, 2, 1, 0, 0], [1, 2, 0, 0, 0, 0], [2, 3, 4, 3, 3, 2],
         [5, 4, 1, 0, 0, 0], [1, 4, 2, 6, 3, 0]],
        tf.int32,
    )
    return x, tf.constant([0, 2, 1, 1, 0], tf.int32)


def test_recurrent_layer_gets_the_mask_of_its_input():
    """An LSTM after `Embedding(mask_zero=True)` receives the mask as a
    keyword argument; its per-example tape must get it too."""
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(7, 4, mask_zero=True)(inputs)
    hidden = keras.layers.LSTM(3, unroll=True)(hidden)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = masked_tokens()
    assert_gram_and_probe_match(network, x, y)


def test_layer_with_several_outputs_matches_loop():
    inputs = keras.Input((4, 3))
    sequence, _, cell_state = keras.layers.LSTM(
        3, return_state=True, unroll=True
    )(inputs)
    hidden = keras.layers.Concatenate()([sequence, cell_state])
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((4, 3), 5, 3, seed=6)
    assert_gram_and_probe_match(network, x, y)


class ScaleWithSpareWeight(keras.layers.Layer):
    """x ⊙ w, with a second weight that the call does not use."""

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="random_normal"
        )
        self.spare = self.add_weight(shape=(2,), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def test_fallback_layer_with_unused_weight_matches_loop():
    """The unused weight has a zero gradient for every example."""
    inputs = keras.Input((6,))
    hidden = ScaleWithSpareWeight()(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((6,), 5, 3, seed=9)
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            logits = network(x[i : i + 1], training=True)
            loss = tf.reduce_sum(LOSS.call(y[i : i + 1], logits))
        gradients = tape.gradient(loss, network.trainable_weights)
        rows.append(
            np.concatenate([np.ravel(g) for g in gradients if g is not None])
        )
    jacobian = np.stack(rows).astype(np.float64)
    assert_gram_and_probe_match(network, x, y, jacobian @ jacobian.T)


def test_fallback_layer_with_dropout_is_rejected():
    """The tape would run the layer again with new dropout masks."""
    inputs = keras.Input((4, 3))
    hidden = keras.layers.LSTM(3, dropout=0.5)(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((4, 3), 5, 3, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            NotImplementedError, match=r"'lstm\w*' \(LSTM\) draws random"
        ):
            gram.gram_matrix(network, LOSS, x, y)


class LeakyProjection(keras.layers.Layer):
    """Leaky ReLU of x W, whose slope is called `rate`: no random numbers."""

    def __init__(self, units, rate=0.2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.rate = rate

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform"
        )

    def call(self, inputs):
        return tf.nn.leaky_relu(inputs @ self.kernel, alpha=self.rate)


def test_fallback_layer_with_deterministic_rate_matches_loop():
    """A `rate` attribute marks a layer as random only when the layer also
    has a seed generator, as Keras' random layers do."""
    inputs = keras.Input((6,))
    hidden = LeakyProjection(5, name="leaky")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((6,), 5, 3, seed=12)
    assert gram._random_setting(network.get_layer("leaky")) is None
    assert_gram_and_probe_match(network, x, y)


class NoisyScale(keras.layers.Layer):
    """x ⊙ w, plus Gaussian noise from `keras.random` in training."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(3)

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, inputs, training=None):
        if training:
            inputs = inputs + keras.random.normal(
                keras.ops.shape(inputs), stddev=0.1, seed=self.seed_generator
            )
        return inputs * self.scale


def test_fallback_layer_with_own_noise_is_rejected():
    """No attribute shows that the layer draws random numbers, but the ops
    of its per-example call do."""
    inputs = keras.Input((6,))
    hidden = NoisyScale(name="noisy")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    x, y = random_batch((6,), 5, 3, seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            NotImplementedError,
            match=r"'noisy' \(NoisyScale\) draws random numbers in training "
            r"\(ops [^)]*StatelessRandomNormalV2",
        ):
            gram.gram_matrix(network, LOSS, x, y)


def test_random_op_types():
    assert gram._is_random_op("StatelessRandomUniformV2")
    assert gram._is_random_op("RandomStandardNormal")
    assert gram._is_random_op("StatelessTruncatedNormalV2")
    assert gram._is_random_op("RngReadAndSkip")
    assert not gram._is_random_op("StatelessIf")
    assert not gram._is_random_op("MatMul")


# Outputs with a loss value per position.


def sequence_labeller(mask_zero):
    """Embedding, Dense and Dense logits for a label at every position."""
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(7, 4, mask_zero=mask_zero)(inputs)
    hidden = keras.layers.Dense(5, activation="tanh")(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


@pytest.mark.parametrize("mask_zero", [False, True], ids=["plain", "masked"])
def test_label_per_position_matches_loop(mask_zero):
    """Keras averages the loss over every unmasked position of the batch,
    B·T values or fewer, not over the B examples. The probe of `fit` must
    still give the Gram matrix of each example's summed loss."""
    network = sequence_labeller(mask_zero)
    x, _ = masked_tokens()
    y = tf.constant(
        np.random.default_rng(8).integers(0, 3, size=(5, 6)), tf.int32
    )
    expected = single_example_gram(network, x, y, padding_mask=mask_zero)
    assert_gram_and_probe_match(network, x, y, expected)
