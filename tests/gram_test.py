"""Tests of the per-layer Gram matrix against closed forms and plain loops."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.gram_paths_test import compiled_gram
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher import models
from tf_fisher.model import FisherModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def assert_matrix_close(actual, expected, rtol=1e-4):
    """Compare two matrices entrywise, with a floor relative to the largest
    entry so that near-zero entries are judged on the matrix's scale."""
    expected = np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * scale
    )


def digit_batch(digits, size, offset=0):
    images = digits.train_images[offset : offset + size]
    labels = digits.train_labels[offset : offset + size]
    return tf.constant(images), tf.constant(labels)


def loop_jacobian(model, loss, x, y):
    """Return J `[batch, P]` in float64, from one tape per example."""
    rows = []
    for i in range(int(x.shape[0])):
        with tf.GradientTape() as tape:
            logits = model(x[i : i + 1], training=True)
            value = tf.reduce_sum(loss.call(y[i : i + 1], logits))
        gradients = tape.gradient(value, model.trainable_weights)
        rows.append(
            np.concatenate([np.ravel(g.numpy()) for g in gradients])
        )
    return np.stack(rows).astype(np.float64)


def two_output_network(outputs_as):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(7, activation="relu")(inputs)
    classes = keras.layers.Dense(3, name="classes")(hidden)
    value = keras.layers.Dense(1, name="value")(hidden)
    if outputs_as == "dict":
        return keras.Model(inputs, {"classes": classes, "value": value})
    return keras.Model(inputs, [classes, value])


@pytest.mark.parametrize("outputs_as", ["dict", "list"])
def test_gram_matrix_sums_losses_of_outputs(outputs_as):
    """Column i of J is the gradient of example i's cross-entropy plus its
    squared error, from one tape per example."""
    keras.utils.set_random_seed(3)
    network = two_output_network(outputs_as)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 8)
    targets = rng.normal(size=(8, 1)).astype(np.float32)
    rows = []
    for i in range(8):
        with tf.GradientTape() as tape:
            outputs = tf.nest.flatten(network(x[i : i + 1], training=True))
            value = LOSS(labels[i : i + 1], outputs[0]) + tf.reduce_sum(
                keras.losses.mean_squared_error(targets[i : i + 1],
                                                outputs[1])
            )
        gradients = tape.gradient(value, network.trainable_weights)
        rows.append(np.concatenate([np.ravel(g) for g in gradients]))
    jacobian = np.stack(rows).astype(np.float64)
    if outputs_as == "dict":
        loss = {"classes": LOSS, "value": "mse"}
        y = {"classes": labels, "value": targets}
    else:
        loss, y = [LOSS, "mse"], [labels, targets]
    actual = gram.gram_matrix(network, loss, x, y)
    assert_matrix_close(actual, jacobian @ jacobian.T)


def test_gram_matrix_rejects_loss_per_output_mismatch():
    network = two_output_network("dict")
    x = np.zeros((4, 6), np.float32)
    y = {"classes": np.zeros(4), "value": np.zeros((4, 1))}
    with pytest.raises(ValueError) as error:
        gram.gram_matrix(network, {"classes": LOSS}, x, y)
    assert str(error.value) == (
        "For a model with several outputs, gram_matrix needs a loss and a "
        "target for each output, in a list or dict with the structure of "
        "the outputs. Received: outputs keyed ['classes', 'value'], losses "
        "keyed ['classes'] and targets keyed ['classes', 'value']."
    )


def test_gram_matrix_scalar_loss_counts_as_mean(digits):
    """A loss function that returns the batch mean gives the Gram matrix of
    the per-example losses, as FisherModel takes it."""
    model = models.mlp((32, 32, 1), 10, seed=0)
    x, y = digit_batch(digits, 8)

    def mean_loss(labels, logits):
        return tf.reduce_mean(LOSS.call(labels, logits))

    assert_matrix_close(
        gram.gram_matrix(model, mean_loss, x, y),
        gram.gram_matrix(model, LOSS, x, y),
        rtol=1e-6,
    )


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


# Softmax regression: a closed form for the per-example gradients.


def test_softmax_regression_gram_matches_closed_form(digits):
    x, y = digit_batch(digits, 12)
    inputs = keras.Input(digits.input_shape)
    logits = keras.layers.Dense(10)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, logits)
    dense = model.layers[-1]
    dense.bias.assign(np.linspace(-0.5, 0.5, 10).astype(np.float32))

    # g_i = (p_i - y_i) ⊗ [x_i, 1], so F_ij = (x_i·x_j + 1)(e_i·e_j) with
    # e = p - onehot(y). Sum convention: no 1/B.
    features = x.numpy().reshape(12, -1).astype(np.float64)
    kernel = dense.kernel.numpy().astype(np.float64)
    bias = dense.bias.numpy().astype(np.float64)
    errors = softmax(features @ kernel + bias) - np.eye(10)[y.numpy()]
    expected = (features @ features.T + 1.0) * (errors @ errors.T)

    for method in ("fast", "tape"):
        actual = gram.gram_matrix(model, LOSS, x, y, method=method)
        assert actual.dtype == tf.float64
        assert actual.shape == (12, 12)
        assert_matrix_close(actual.numpy(), expected)


# The package MLP against a loop of single-example gradients.


def test_mlp_gram_matches_single_example_loop(digits):
    model = models.build_model(
        "mlp", digits.input_shape, digits.num_classes, seed=3
    )
    x, y = digit_batch(digits, 8, offset=100)
    jacobian = loop_jacobian(model, LOSS, x, y)
    expected = jacobian @ jacobian.T

    assert_matrix_close(gram.gram_matrix(model, LOSS, x, y), expected)
    assert_matrix_close(
        gram.gram_matrix(model, LOSS, x, y, method="tape"), expected
    )
    assert_matrix_close(gram.loop_gram_matrix(model, LOSS, x, y), expected)
    assert_matrix_close(
        gram.whole_model_gram_matrix(model, LOSS, x, y), expected
    )


def test_per_example_gradients_match_loop(digits):
    model = models.build_model(
        "mlp", digits.input_shape, digits.num_classes, seed=4
    )
    x, y = digit_batch(digits, 4, offset=7)
    jacobian = gram.per_example_gradients(model, LOSS, x, y).numpy()
    assert jacobian.shape == (4, model.count_params())
    assert_matrix_close(jacobian, loop_jacobian(model, LOSS, x, y))


# A BatchNorm network: per-example contributions from numpy.


def same_or_valid_padding(size, kernel, stride, dilation, padding):
    """Return (output size, padding before) as TensorFlow pads a conv."""
    extent = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - extent) // stride + 1, 0
    output = -(-size // stride)
    total = max((output - 1) * stride + extent - size, 0)
    return output, total // 2


def numpy_patches(x, layer):
    """Input patches `[batch, out_h, out_w, k_h, k_w, channels]` of a
    Conv2D, with TensorFlow's padding, strides and dilation."""
    (k_h, k_w), (s_h, s_w) = layer.kernel_size, layer.strides
    d_h, d_w = layer.dilation_rate
    batch, height, width, _ = x.shape
    out_h, top = same_or_valid_padding(height, k_h, s_h, d_h, layer.padding)
    out_w, left = same_or_valid_padding(width, k_w, s_w, d_w, layer.padding)
    padded = np.pad(
        x,
        ((0, 0), (top, k_h * d_h + s_h), (left, k_w * d_w + s_w), (0, 0)),
    )
    patches = np.empty((batch, out_h, out_w, k_h, k_w, x.shape[3]))
    for i in range(k_h):
        for j in range(k_w):
            rows = slice(i * d_h, i * d_h + s_h * out_h, s_h)
            columns = slice(j * d_w, j * d_w + s_w * out_w, s_w)
            patches[:, :, :, i, j, :] = padded[:, rows, columns, :]
    return patches


def numpy_contributions(layer, inputs, output, delta):
    """Per-example contributions `[batch, ...]` of each trainable weight.

    Args:
        layer: a Dense, Conv2D or BatchNormalization layer with a linear
            output (no fused activation).
        inputs: float64 layer input.
        output: float64 layer output, to check the forward pass.
        delta: float64 gradient of the summed batch loss at the output.

    Returns:
        A list aligned with `layer.trainable_weights`.
    """
    if isinstance(layer, keras.layers.BatchNormalization):
        # Statistics over the batch and any spatial axes; contributions
        # summed over the spatial axes of each example.
        batch_axes = tuple(range(inputs.ndim - 1))
        spatial_axes = batch_axes[1:]
        mean = inputs.mean(axis=batch_axes)
        variance = inputs.var(axis=batch_axes)
        normalized = (inputs - mean) / np.sqrt(variance + layer.epsilon)
        gamma = layer.gamma.numpy() if layer.scale else 1.0
        beta = layer.beta.numpy() if layer.center else 0.0
        assert_matrix_close(
            output.reshape(-1, output.shape[-1]),
            (normalized * gamma + beta).reshape(-1, output.shape[-1]),
        )
        contributions = []
        if layer.scale:
            contributions.append((normalized * delta).sum(axis=spatial_axes))
        if layer.center:
            contributions.append(delta.sum(axis=spatial_axes))
        return contributions
    assert layer.activation is keras.activations.linear
    kernel = layer.kernel.numpy().astype(np.float64)
    if isinstance(layer, keras.layers.Conv2D):
        patches = numpy_patches(inputs, layer)
        forward = np.einsum("bpqijc,ijco->bpqo", patches, kernel)
        per_example = [np.einsum("bpqijc,bpqo->bijco", patches, delta)]
    else:
        forward = inputs @ kernel
        per_example = [np.einsum("bc,bo->bco", inputs, delta)]
    if layer.bias is not None:
        forward = forward + layer.bias.numpy()
        axes = tuple(range(1, delta.ndim - 1))
        per_example.append(delta.sum(axis=axes) if axes else delta)
    assert_matrix_close(
        output.reshape(output.shape[0], -1),
        forward.reshape(forward.shape[0], -1),
    )
    return per_example


def traced_batch_gradients(model, x, y):
    """Trace one training-mode pass and return the calls, their output
    gradients and each weight's batch gradient, all of the summed loss."""
    with tf.GradientTape() as tape:
        logits, calls = gram.traced_call(model, x, training=True)
        total = tf.reduce_sum(LOSS.call(y, logits))
    sources = list(model.trainable_weights) + [c.output for c in calls]
    gradients = tape.gradient(total, sources)
    weight_count = len(model.trainable_weights)
    return calls, gradients[weight_count:], gradients[:weight_count]


@pytest.fixture(scope="module")
def resnet8():
    return models.build_model("resnet8", (8, 8, 1), 10, seed=5)


@pytest.fixture(scope="module")
def bn_batch():
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(size=(6, 8, 8, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=6).astype(np.int32))
    return x, y


def numpy_jacobian(model, calls, output_gradients, batch_gradients):
    """Return J `[batch, P]` from numpy contributions, after checking that
    each weight's contributions sum to its batch gradient."""
    by_weight = {}
    for call, delta in zip(calls, output_gradients, strict=True):
        contributions = numpy_contributions(
            call.layer,
            call.inputs.numpy().astype(np.float64),
            call.output.numpy().astype(np.float64),
            delta.numpy().astype(np.float64),
        )
        for weight, value in zip(
            call.layer.trainable_weights, contributions, strict=True
        ):
            by_weight[id(weight)] = value
    columns = []
    for weight, batch_gradient in zip(
        model.trainable_weights, batch_gradients, strict=True
    ):
        per_example = by_weight[id(weight)]
        assert per_example.shape[1:] == tuple(weight.shape), weight.path
        # Round-off of a sum scales with its terms, and some batch gradients
        # (β of a BN that feeds another BN) are zero up to float32 noise.
        np.testing.assert_allclose(
            per_example.sum(axis=0),
            batch_gradient.numpy(),
            rtol=1e-4,
            atol=1e-5 * np.abs(per_example).max(),
            err_msg=weight.path,
        )
        columns.append(per_example.reshape(per_example.shape[0], -1))
    return np.concatenate(columns, axis=1)


def test_bn_contributions_sum_to_batch_gradient(resnet8, bn_batch):
    x, y = bn_batch
    calls, output_gradients, batch_gradients = traced_batch_gradients(
        resnet8, x, y
    )
    kinds = {type(c.layer).__name__ for c in calls}
    assert kinds == {"Conv2D", "BatchNormalization", "Dense"}
    jacobian = numpy_jacobian(
        resnet8, calls, output_gradients, batch_gradients
    )
    trainable = sum(int(np.prod(w.shape)) for w in resnet8.trainable_weights)
    assert jacobian.shape == (6, trainable)


def test_bn_gram_matches_numpy_contributions(resnet8, bn_batch):
    x, y = bn_batch
    calls, output_gradients, batch_gradients = traced_batch_gradients(
        resnet8, x, y
    )
    jacobian = numpy_jacobian(
        resnet8, calls, output_gradients, batch_gradients
    )
    expected = jacobian @ jacobian.T
    for method in ("fast", "tape"):
        actual = gram.gram_matrix(resnet8, LOSS, x, y, method=method).numpy()
        np.testing.assert_allclose(
            np.diag(actual), (jacobian**2).sum(axis=1), rtol=1e-4
        )
        assert_matrix_close(actual, expected)
        # 1ᵀ F 1 = ‖Σ_i g_i‖², the squared norm of the batch gradient.
        batch_norm = sum(
            float(tf.reduce_sum(g**2)) for g in batch_gradients
        )
        np.testing.assert_allclose(actual.sum(), batch_norm, rtol=1e-4)


def test_bn_layer_tape_matches_numpy(resnet8, bn_batch):
    x, y = bn_batch
    calls, output_gradients, _ = traced_batch_gradients(resnet8, x, y)
    for call, delta in zip(calls, output_gradients, strict=True):
        contributions = numpy_contributions(
            call.layer,
            call.inputs.numpy().astype(np.float64),
            call.output.numpy().astype(np.float64),
            delta.numpy().astype(np.float64),
        )
        expected = np.concatenate(
            [c.reshape(c.shape[0], -1) for c in contributions], axis=1
        )
        actual = gram._per_example_layer_gradients(
            call.layer, call.inputs, delta
        )
        assert_matrix_close(actual.numpy(), expected)


def masked_batch_norm_network():
    """Embedding(mask_zero=True), BatchNormalization, masked average and
    Dense logits."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(7, 3, mask_zero=True)(inputs)
    x = keras.layers.BatchNormalization(gamma_initializer="random_uniform")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_masked_batch_norm_uses_masked_moments():
    """BatchNormalization takes its moments over the positions that the
    mask keeps. Its block, alone and in the Gram matrix of each method,
    must use the same x̂."""
    network = masked_batch_norm_network()
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 7, size=(6, 5)).astype(np.int32)
    tokens[:, 3:] = 0
    tokens[0, 1:] = 0
    x = tf.constant(tokens)
    y = tf.constant(rng.integers(0, 3, size=6).astype(np.int32))
    calls, output_gradients, _ = traced_batch_gradients(network, x, y)
    index = next(
        i for i, call in enumerate(calls)
        if isinstance(call.layer, keras.layers.BatchNormalization)
    )
    call, delta = calls[index], output_gradients[index].numpy()
    inputs = call.inputs.numpy().astype(np.float64)
    unmasked = (tokens != 0)[..., None]
    mean = (inputs * unmasked).sum(axis=(0, 1)) / unmasked.sum()
    squares = ((inputs - mean) ** 2) * unmasked
    variance = squares.sum(axis=(0, 1)) / unmasked.sum()
    normalized = (inputs - mean) / np.sqrt(variance + call.layer.epsilon)
    contributions = np.concatenate(
        [(normalized * delta).sum(axis=1), delta.sum(axis=1)], axis=1
    )
    expected_block = contributions @ contributions.T

    with warnings.catch_warnings():
        # The Embedding's block comes from the per-layer tape.
        warnings.simplefilter("ignore")
        other_blocks = sum(
            gram.layer_gram(other, gradient).numpy().astype(np.float64)
            for i, (other, gradient) in enumerate(
                zip(calls, output_gradients, strict=True)
            )
            if i != index
        )
        for method in ("fast", "tape"):
            block = gram.layer_gram(call, output_gradients[index], method)
            assert_matrix_close(block.numpy(), expected_block)
            actual = gram.gram_matrix(network, LOSS, x, y, method=method)
            assert_matrix_close(actual.numpy(), other_blocks + expected_block)


# Networks with BatchNormalization against numpy contributions, in each
# setting the package forms their Gram matrix: an eager call, a function
# compiled for any batch size, and the probed step of `fit`.


def numpy_gram(model, x, y):
    """Return J Jᵀ in float64 from the numpy contributions of a training
    pass."""
    calls, output_gradients, batch_gradients = traced_batch_gradients(
        model, x, y
    )
    jacobian = numpy_jacobian(
        model, calls, output_gradients, batch_gradients
    )
    return jacobian @ jacobian.T


def vector_batch_norm_model(input_shape, seed):
    """Build Dense, BatchNormalization with γ and β on vectors, ReLU and
    Dense logits."""
    initializer = keras.initializers.GlorotUniform(seed)
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(8, kernel_initializer=initializer)(x)
    x = keras.layers.BatchNormalization(gamma_initializer="random_uniform")(x)
    x = keras.layers.ReLU()(x)
    logits = keras.layers.Dense(10, kernel_initializer=initializer)(x)
    return keras.Model(inputs, logits)


def batch_norm_network(name, seed=5):
    if name == "vector_bn":
        return vector_batch_norm_model((8, 8, 1), seed)
    channels = 3 if name == "resnet20" else 1
    return models.build_model(name, (8, 8, channels), 10, seed=seed)


def network_batch(network, size=6, seed=11):
    rng = np.random.default_rng(seed)
    shape = (size, *network.input_shape[1:])
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=size).astype(np.int32))
    return x, y


BATCH_NORM_NETWORKS = ["vector_bn", "resnet8", "densenet8", "resnet20"]


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", BATCH_NORM_NETWORKS)
def test_batch_norm_networks_match_numpy_contributions(name, static):
    network = batch_norm_network(name)
    x, y = network_batch(network)
    if static:
        actual = gram.gram_matrix(network, LOSS, x, y)
    else:
        actual = compiled_gram(network, x, y)
    assert_matrix_close(actual.numpy(), numpy_gram(network, x, y))


@pytest.mark.parametrize(
    "method, block_overlap", [("fast", 2), ("fast", 0), ("tape", 2)]
)
@pytest.mark.parametrize("name", BATCH_NORM_NETWORKS)
def test_fit_probe_matches_numpy_contributions(name, method, block_overlap):
    """The probe of a `fit` step, with the mean-reduced loss that Keras
    trains on, records the spectrum of the summed loss's J Jᵀ, whether or
    not the Gram blocks overlap the backward pass of later layers."""
    network = batch_norm_network(name)
    x, y = network_batch(network)
    expected = {
        key: float(value)
        for key, value in measures.spectrum_statistics(
            tf.constant(numpy_gram(network, x, y))
        ).items()
    }
    model = FisherModel(
        network, fisher_interval=1, gram_method=method,
        block_overlap=block_overlap,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    recorded = model.read_probe_values()
    for key in ("trace", "lambda_max", "lambda_min", "condition_number"):
        assert recorded[key] == pytest.approx(expected[key], rel=1e-4), key
    assert recorded["rank"] == expected["rank"] == 6


def test_trained_mlp_spectrum_matches_float64(digits):
    """After a few epochs, the gradients of fitted examples shrink and the
    spectrum runs down to round-off, so c_k depends on where the nonzero
    eigenvalues are cut. At each tolerance from 1e-9 up, the float32 Gram
    gives the rank and c_k of J Jᵀ formed in float64."""
    keras.utils.set_random_seed(1)
    network = models.build_model("mlp", digits.input_shape, 10, seed=3)
    network.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
        loss=LOSS,
    )
    network.fit(
        digits.train_images, digits.train_labels, batch_size=32, epochs=4,
        verbose=0,
    )
    x, y = digit_batch(digits, 32)
    jacobian = loop_jacobian(network, LOSS, x, y)
    expected_gram = tf.constant(jacobian @ jacobian.T)
    actual_gram = gram.gram_matrix(network, LOSS, x, y)
    ranks = []
    for tolerance in (1e-9, 1e-7, 1e-5):
        actual = measures.spectrum_statistics(actual_gram, tolerance)
        expected = measures.spectrum_statistics(expected_gram, tolerance)
        assert float(actual["rank"]) == float(expected["rank"]), tolerance
        assert float(actual["condition_number"]) == pytest.approx(
            float(expected["condition_number"]), rel=1e-4
        ), tolerance
        ranks.append(float(expected["rank"]))
    # The case under test: the cut falls inside the spectrum.
    assert ranks[0] < 32


# Closed forms ("fast") against the per-layer tape on awkward layers.


def mixed_model(batch_norm, seed=0):
    """Conv2D with stride 2 and "same" padding on an odd size, a dilated
    conv, optional BatchNormalization, a "valid" stride-2 conv, a Dense on a
    3-D input, and Dense logits."""
    initializer = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(
        3, 3, strides=2, padding="same", activation="relu",
        kernel_initializer=initializer,
    )(inputs)
    x = keras.layers.Conv2D(
        4, 3, padding="same", dilation_rate=2, activation="tanh",
        bias_initializer="ones",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(4, 2, strides=2, padding="valid")(x)
    x = keras.layers.Reshape((4, 4))(x)
    x = keras.layers.Dense(6, activation="sigmoid")(x)
    x = keras.layers.Flatten()(x)
    logits = keras.layers.Dense(3, activation="linear")(x)
    return keras.Model(inputs, logits)


def mixed_batch(size=5, seed=2):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(size, 9, 9, 2)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, size=size).astype(np.int32))
    return x, y


def test_fast_and_tape_agree_with_batch_norm():
    model = mixed_model(batch_norm=True)
    x, y = mixed_batch()
    fast = gram.gram_matrix(model, LOSS, x, y, method="fast").numpy()
    tape = gram.gram_matrix(model, LOSS, x, y, method="tape").numpy()
    assert_matrix_close(fast, tape)
    assert np.abs(fast).max() > 0


def test_fast_and_tape_match_loop_without_batch_norm():
    model = mixed_model(batch_norm=False)
    x, y = mixed_batch()
    jacobian = loop_jacobian(model, LOSS, x, y)
    expected = jacobian @ jacobian.T
    for method in ("fast", "tape"):
        assert_matrix_close(
            gram.gram_matrix(model, LOSS, x, y, method=method), expected
        )


@pytest.mark.parametrize("form", ["pairwise", "materialised"])
def test_both_conv_forms_match_loop(form, monkeypatch):
    # Force each way of forming the Conv2D and Dense kernel blocks.
    monkeypatch.setattr(gram, "linear_gram_form", lambda *shape: form)
    model = mixed_model(batch_norm=False, seed=1)
    x, y = mixed_batch(size=4, seed=3)
    jacobian = loop_jacobian(model, LOSS, x, y)
    assert_matrix_close(
        gram.gram_matrix(model, LOSS, x, y), jacobian @ jacobian.T
    )


@pytest.mark.parametrize(
    "positions, d_in, d_out, form",
    [
        (1, 7, 3, "pairwise"),
        (2, 40, 40, "pairwise"),
        (30, 2, 3, "materialised"),
    ],
)
def test_linear_gram_matches_outer_products(
    positions, d_in, d_out, form
):
    assert gram.linear_gram_form(4, positions, d_in, d_out) == form
    rng = np.random.default_rng(positions)
    a = rng.normal(size=(4, positions, d_in)).astype(np.float32)
    g = rng.normal(size=(4, positions, d_out)).astype(np.float32)
    per_example = np.einsum("btd,bte->bde", a, g).reshape(4, -1)
    expected = per_example.astype(np.float64) @ per_example.T
    actual = gram.linear_gram(tf.constant(a), tf.constant(g))
    assert_matrix_close(actual.numpy(), expected)


# Errors.


def test_gram_matrix_rejects_unknown_method():
    model = mixed_model(batch_norm=False)
    x, y = mixed_batch()
    with pytest.raises(ValueError, match="method='exact'"):
        gram.gram_matrix(model, LOSS, x, y, method="exact")


def test_subclassed_model_cannot_be_traced():
    class Linear(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    model = Linear()
    model(tf.zeros([1, 3]))
    assert not gram.can_trace(model)
    with pytest.raises(ValueError, match="Cannot trace"):
        gram.traced_call(model, tf.zeros([1, 3]))


def test_shared_layer_is_rejected():
    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3)
    model = keras.Model(inputs, shared(shared(inputs)))
    x = tf.ones([2, 3])
    y = tf.constant([0, 1])
    with pytest.raises(NotImplementedError) as error:
        gram.gram_matrix(model, LOSS, x, y)
    assert str(error.value).startswith(
        f"Layer {shared.name!r} is called more than once in one forward pass"
    )


def test_shared_submodel_is_named():
    """A siamese network calls its encoder twice: the message names the
    encoder, not only the layer inside it."""
    encoder = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4)], name="encoder"
    )
    inputs = keras.Input((6,))
    pair = keras.layers.Concatenate()(
        [encoder(inputs[:, :3]), encoder(inputs[:, 3:])]
    )
    model = keras.Model(inputs, keras.layers.Dense(3)(pair))
    with pytest.raises(NotImplementedError) as error:
        gram.gram_matrix(model, LOSS, tf.ones([2, 6]), tf.constant([0, 1]))
    inner = encoder.layers[0].name
    assert str(error.value).startswith(
        f"Layer {inner!r} (in model 'encoder') is called more than once"
    )
