"""Tests that every route of the fast Gram matrix matches a slower reference.

The fast route forms each layer's block by a closed form: pairwise products
or materialised per-example gradients for Dense and Conv2D, chosen by
multiply-add count, the per-example contributions for BatchNormalization,
and a per-layer tape for any other layer. Each test checks one route against
J Jᵀ from single-example gradients (networks without BatchNormalization) or
against the per-layer tape (networks with it), to a relative 1e-4 of the
largest entry, in float32.
"""

import itertools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_fisher import gram
from tf_fisher import measures
from tf_fisher import models
from tf_fisher.model import FisherModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = 1e-4


def assert_gram_close(actual, expected):
    """Compare entrywise, with a floor of RTOL times the largest entry."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.abs(expected).max() > 0, "the reference Gram matrix is zero"
    np.testing.assert_allclose(
        actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max()
    )


def single_example_gram(model, x, y):
    """Return J Jᵀ in float64 from one tape per example, J `[batch, P]`.

    `x` is a tensor, or a list or dict of them for a model with several
    inputs.
    """
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            example = tf.nest.map_structure(lambda t, i=i: t[i : i + 1], x)
            logits = model(example, training=True)
            loss = tf.reduce_sum(LOSS.call(y[i : i + 1], logits))
        weights = model.trainable_weights
        gradients = tape.gradient(loss, weights)
        # A weight that the loss does not reach has a None gradient.
        rows.append(np.concatenate([
            np.zeros(np.prod(w.shape)) if g is None else np.ravel(g)
            for w, g in zip(weights, gradients, strict=True)
        ]))
    jacobian = np.stack(rows).astype(np.float64)
    return jacobian @ jacobian.T


def random_batch(input_shape, size, classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, *input_shape)).astype(np.float32)
    y = rng.integers(0, classes, size=size).astype(np.int32)
    return tf.constant(x), tf.constant(y)


def digit_batch(digits, size, channels=1):
    images = digits.train_images[:size]
    if channels != images.shape[-1]:
        images = np.repeat(images, channels, axis=-1)
    return tf.constant(images), tf.constant(digits.train_labels[:size])


def fast_gram_without_warnings(model, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return gram.gram_matrix(model, LOSS, x, y, method="fast")


@pytest.fixture
def route_calls(monkeypatch):
    """Record the arguments of each call of the grouped filter-gradient,
    input-patch and pairwise routes of `_conv_gram` and `_linear_block`."""
    calls = {"grouped": [], "patches": [], "pairwise": []}
    for route, name in (
        ("grouped", "_conv_kernel_gradients"),
        ("patches", "_conv_patches"),
        ("pairwise", "_pairwise_gram"),
    ):
        original = getattr(gram, name)

        def counting(*args, route=route, original=original):
            calls[route].append(args)
            return original(*args)

        monkeypatch.setattr(gram, name, counting)
    return calls


def assert_route_taken(route, route_calls):
    """Check that the convolution took `route` and no other."""
    routes_taken = {name for name, calls in route_calls.items() if calls}
    # The pairwise form of a convolution also starts from input patches.
    expected = {"pairwise", "patches"} if route == "pairwise" else {route}
    assert routes_taken == expected, route_calls


def compiled_gram(model, x, y):
    """Return `gram.gram_matrix` from a function compiled for any batch
    size, as `fit` compiles the training step."""
    return tf.function(
        lambda x, y: gram.gram_matrix(model, LOSS, x, y),
        input_signature=[
            tf.TensorSpec([None, *x.shape[1:]]),
            tf.TensorSpec([None], tf.int32),
        ],
    )(x, y)


# Dense layers.


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "elu"])
def test_dense_on_vectors_matches_loop(activation):
    """One position per example: ((A Aᵀ) + 1) ⊙ (G Gᵀ). ELU has no
    derivative written from its output, so its layer recomputes it."""
    inputs = keras.Input((7,))
    hidden = keras.layers.Dense(
        6, activation=activation, bias_initializer="ones"
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
    x, y = random_batch((7,), 9, 4, seed=1)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        single_example_gram(model, x, y),
    )


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "positions, width, expected_form",
    [(2, 40, "pairwise"), (30, 3, "materialised")],
)
def test_dense_on_sequences_matches_loop(
    positions, width, expected_form, static, route_calls
):
    """A Dense on `[batch, positions, features]` shares its kernel across
    positions; the shapes select each form, for the batch of 5 and for the
    128 examples assumed when the batch size is unknown."""
    batch = 5
    for assumed in (batch, 128):
        assert gram.linear_gram_form(assumed, positions, width, width) == (
            expected_form
        )
    inputs = keras.Input((positions, width))
    hidden = keras.layers.Dense(width, activation="tanh")(inputs)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(hidden))
    model = keras.Model(inputs, logits)
    x, y = random_batch((positions, width), batch, 3, seed=2)
    actual = (
        fast_gram_without_warnings(model, x, y) if static
        else compiled_gram(model, x, y)
    )
    assert_gram_close(actual, single_example_gram(model, x, y))
    assert bool(route_calls["pairwise"]) == (expected_form == "pairwise")


# Conv2D layers.


def conv_model(input_shape, filters, kernel_size, **conv_options):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(filters, kernel_size, **conv_options)(inputs)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    return keras.Model(inputs, logits)


# Shapes for which `_conv_gram` takes each route, at a batch of 6 and when
# the batch size is unknown: (input shape, filters, padding).
ROUTE_SHAPES = {
    "grouped": ((9, 9, 2), 4, "same"),
    "patches": ((4, 4, 32), 64, "same"),
    # A 3 x 3 "valid" kernel on a 4 x 4 input leaves 4 output positions,
    # where pairwise products over positions are the cheaper form.
    "pairwise": ((4, 4, 16), 64, "valid"),
}
# The routes that materialise per-example kernel gradients.
MATERIALISED_ROUTES = ["grouped", "patches"]


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("route", sorted(ROUTE_SHAPES))
def test_conv_routes_match_loop(route, static, route_calls):
    """Each route of a Conv2D block, with the batch size known when the
    function is traced, and unknown as in `fit`."""
    input_shape, filters, padding = ROUTE_SHAPES[route]
    model = conv_model(
        input_shape, filters, 3, padding=padding, activation="relu"
    )
    x, y = random_batch(input_shape, 6, 3, seed=3)
    actual = (
        fast_gram_without_warnings(model, x, y) if static
        else compiled_gram(model, x, y)
    )
    assert_gram_close(actual, single_example_gram(model, x, y))
    assert_route_taken(route, route_calls)


@pytest.mark.parametrize(
    "batch, conv_options",
    [
        (5, {"strides": 2, "padding": "same", "activation": "sigmoid"}),
        (5, {"dilation_rate": 2, "padding": "same", "activation": "tanh"}),
        (5, {"strides": (2, 1), "padding": "valid", "use_bias": False}),
        # More examples than one grouped op takes: chunks, one of them
        # padded with zero examples.
        (21, {"strides": 1, "padding": "same", "activation": "relu"}),
    ],
    ids=["stride2_same", "dilated", "valid_uneven_strides", "chunked"],
)
def test_conv_materialised_form_matches_loop(batch, conv_options):
    assert gram.linear_gram_form(batch, 9 * 9, 9 * 2, 4) == "materialised"
    model = conv_model((9, 9, 2), 4, 3, **conv_options)
    x, y = random_batch((9, 9, 2), batch, 3, seed=4)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        single_example_gram(model, x, y),
    )


def test_conv_materialised_with_unknown_batch_matches_loop():
    """Inside a compiled function the batch size is unknown, so the batch
    is split into chunks at run time."""
    model = conv_model((9, 9, 2), 4, 3, padding="same", activation="relu")
    x, y = random_batch((9, 9, 2), 19, 3, seed=5)
    assert_gram_close(
        compiled_gram(model, x, y), single_example_gram(model, x, y)
    )


@pytest.mark.parametrize("rows", [255, 301, 512])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_row_products_match_numpy(rows, static):
    """M Mᵀ from one product (255 rows) and from upper row blocks (301 and
    512 rows), with the rows known when traced or only at run time."""
    matrix = np.random.default_rng(rows).normal(
        size=(rows, gram._BLOCKED_PRODUCT_COLUMNS)
    ).astype(np.float32)
    signature = [tf.TensorSpec([rows if static else None, matrix.shape[1]])]
    products = tf.function(gram._row_products, input_signature=signature)
    expected = matrix.astype(np.float64) @ matrix.T.astype(np.float64)
    assert_gram_close(products(tf.constant(matrix)), expected)


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_blocked_conv_block_matches_loop(monkeypatch, static):
    """A materialised conv block whose Gram comes from upper row blocks,
    also inside a function compiled for any batch size, as `fit` compiles
    the training step."""
    monkeypatch.setattr(gram, "_BLOCKED_PRODUCT_ROWS", 4)
    monkeypatch.setattr(gram, "_BLOCKED_PRODUCT_COLUMNS", 8)
    blocked_calls = []
    blocked = gram._blocked_row_products

    def counting_blocked(matrix):
        blocked_calls.append(matrix.shape)
        return blocked(matrix)

    monkeypatch.setattr(gram, "_blocked_row_products", counting_blocked)
    model = conv_model((9, 9, 2), 4, 3, padding="same", activation="relu")
    x, y = random_batch((9, 9, 2), 19, 3, seed=8)
    batch = 19 if static else None
    compiled = tf.function(
        lambda x, y: gram.gram_matrix(model, LOSS, x, y),
        input_signature=[
            tf.TensorSpec([batch, 9, 9, 2]),
            tf.TensorSpec([batch], tf.int32),
        ],
    )
    assert_gram_close(compiled(x, y), single_example_gram(model, x, y))
    # The conv kernel's per-example gradients have 3 * 3 * 2 * 4 entries.
    assert [shape[1] for shape in blocked_calls].count(72) == 1


@pytest.mark.parametrize("route", MATERIALISED_ROUTES)
def test_conv_kernel_gradients_sum_to_batch_gradient(route, route_calls):
    """The kernel gradients kept for the update are the sum over examples."""
    input_shape, filters, _ = ROUTE_SHAPES[route]
    layer = keras.layers.Conv2D(filters, 3, padding="same")
    model = keras.Sequential([keras.Input(input_shape), layer])
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(18, *input_shape)), tf.float32)
    output_gradient = tf.constant(
        rng.normal(size=(18, *input_shape[:2], filters)), tf.float32
    )
    _, calls = gram.traced_call(model, x)
    _, kernel_gradients = gram.gram_and_kernel_gradients(
        calls, [output_gradient]
    )
    with tf.GradientTape() as tape:
        output = layer(x)
    expected = tape.gradient(
        output, layer.kernel, output_gradients=output_gradient
    )
    np.testing.assert_allclose(
        kernel_gradients[id(layer.kernel)], expected, rtol=1e-4, atol=1e-4
    )
    assert_route_taken(route, route_calls)


def test_conv_any_map_size_matches_loop():
    """A fully convolutional network compiled for any height and width:
    the output positions are unknown when the step is traced."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    x, y = random_batch((10, 10, 3), 5, 4, seed=12)
    compiled = tf.function(
        lambda x, y: gram.gram_matrix(model, LOSS, x, y),
        input_signature=[
            tf.TensorSpec([None, None, None, 3]),
            tf.TensorSpec([None], tf.int32),
        ],
    )
    assert_gram_close(compiled(x, y), single_example_gram(model, x, y))


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "input_size, conv_options",
    [
        ((8, 8), {"kernel_size": 3, "padding": "same"}),
        ((16, 16), {"kernel_size": 3, "strides": 2, "padding": "same"}),
        ((9, 7), {"kernel_size": 3, "strides": 2, "padding": "same"}),
        ((10, 11), {"kernel_size": (2, 5), "strides": (3, 2),
                    "padding": "same"}),
        ((9, 9), {"kernel_size": 3, "strides": (2, 1), "padding": "valid"}),
        ((7, 10), {"kernel_size": 5, "strides": 3, "padding": "valid"}),
        ((9, 9), {"kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
        ((9, 12), {"kernel_size": (2, 3), "dilation_rate": (1, 3),
                   "padding": "valid"}),
        ((5, 5), {"kernel_size": 1, "strides": 2, "padding": "valid"}),
        # Padding of one more zero after the input than before it.
        ((6, 5), {"kernel_size": (2, 4), "padding": "same"}),
        # Windows wider than the map, so that most taps read padding.
        ((2, 3), {"kernel_size": 5, "strides": (1, 2), "padding": "same"}),
        ((1, 1), {"kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
    ],
    ids=[
        "3x3", "stride2", "stride2_odd", "uneven", "valid_stride_2x1",
        "valid_stride3", "dilated", "dilated_uneven", "1x1_stride2",
        "even_same", "map_under_kernel", "1x1_map_dilated",
    ],
)
def test_conv_patches_match_extract_patches(input_size, conv_options, static):
    """The patches from shifted views equal those of TensorFlow's own op,
    one for each of the layer's output positions."""
    layer = keras.layers.Conv2D(2, **conv_options)
    layer.build((None, *input_size, 3))
    x = tf.constant(
        np.random.default_rng(13).normal(size=(4, *input_size, 3)),
        tf.float32,
    )
    batch = 4 if static else None
    patches = tf.function(
        lambda x: gram._conv_patches(layer, x),
        input_signature=[tf.TensorSpec([batch, *input_size, 3])],
    )(x)
    expected = tf.image.extract_patches(
        x,
        sizes=[1, *layer.kernel_size, 1],
        strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1],
        padding=layer.padding.upper(),
    )
    assert patches.shape[1:3] == layer(x).shape[1:3]
    np.testing.assert_array_equal(patches.numpy(), expected.numpy())


@pytest.mark.parametrize("overlap", [0, 1, 2])
def test_block_waits_for_earlier_block(overlap):
    """A layer's backward pass waits for the block built `overlap` blocks
    before its own, and Dense blocks on vectors take no part."""
    conv = keras.layers.Conv2D(2, 3)
    conv.build((None, 5, 5, 1))
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    conv_call = gram.LayerCall(conv, tf.zeros([1, 5, 5, 1]), tf.zeros([1, 3, 3, 2]))
    dense_call = gram.LayerCall(dense, tf.zeros([1, 3]), tf.zeros([1, 2]))
    with tf.GradientTape() as tape:
        taps = gram.GramTaps(tape, 1.0, block_overlap=overlap)
    blocks = [tf.constant(float(index)) for index in range(5)]

    waited = []
    for block in blocks:
        dense_block = tf.constant(-1.0)
        assert taps._block_to_wait_for(dense_block, dense_call) is None
        waited.append(taps._block_to_wait_for(block, conv_call))

    expected = [None] * overlap + blocks[: len(blocks) - overlap]
    assert len(waited) == len(expected)
    for actual, expected_block in zip(waited, expected):
        assert actual is expected_block


def conv_chain(length, batch_norm=False):
    """`length` layers one after another, Conv2D, or Conv2D and
    BatchNormalization in turn, then a Dense head on vectors."""
    inputs = keras.Input((6, 6, 2))
    x = inputs
    for index in range(length):
        if batch_norm and index % 2:
            x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        else:
            x = keras.layers.Conv2D(
                2, 3, padding="same", name=f"conv{index}"
            )(x)
    logits = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x))
    return keras.Model(inputs, logits)


def traced_blocks(network, x, overlap):
    """Trace one backward pass through `GramTaps` and return the op of each
    Conv2D and BatchNormalization block, keyed by layer name."""
    blocks = {}
    kinds = (keras.layers.Conv2D, keras.layers.BatchNormalization)

    class RecordingTaps(gram.GramTaps):
        def _block_to_wait_for(self, block, call):
            if isinstance(call.layer, kinds):
                blocks[call.layer.name] = block.op
            return super()._block_to_wait_for(block, call)

    @tf.function
    def gram_of_batch(x):
        with tf.GradientTape() as tape:
            taps = RecordingTaps(tape, 1.0, block_overlap=overlap)
            logits, _ = gram.traced_call(network, x, taps=taps)
            total = tf.reduce_sum(tf.square(logits))
        return taps.gram(tape.gradient(total, taps.sources))

    gram_of_batch.get_concrete_function(x)
    return blocks


def op_ancestors(op):
    """Return every op that `op` depends on, through data or control edges."""
    seen = set()
    stack = [op]
    while stack:
        current = stack.pop()
        parents = [tensor.op for tensor in current.inputs]
        parents += list(current.control_inputs)
        for parent in parents:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


@pytest.mark.parametrize("batch_norm", [False, True], ids=["conv", "bn"])
@pytest.mark.parametrize("overlap", [0, 1, 2, 5])
def test_chain_concurrent_blocks(overlap, batch_norm):
    """In the compiled backward pass of a chain of six layers, blocks that
    no data or control edge orders can run at the same time. The largest
    such set must have `overlap` + 1 blocks, or all six. With
    BatchNormalization, whose block `GramTaps.batch_norm` forms inside the
    layer's own backward pass, the bound is the same."""
    length = 6
    network = conv_chain(length, batch_norm)
    x, _ = random_batch((6, 6, 2), 4, 3, seed=14)
    blocks = traced_blocks(network, x, overlap)
    assert len(blocks) == length
    ancestors = {name: op_ancestors(op) for name, op in blocks.items()}

    def unordered(first, second):
        return (
            blocks[first] not in ancestors[second]
            and blocks[second] not in ancestors[first]
        )

    largest = 0
    for size in range(1, length + 1):
        for group in itertools.combinations(blocks, size):
            if all(unordered(a, b) for a, b in itertools.combinations(group, 2)):
                largest = size
    assert largest == min(overlap + 1, length)


def branching_model():
    """Two inputs, three convolutions that read the same tensor, a nested
    residual model, an LSTM whose cell state the loss never reaches, and a
    convolution cut off from the loss by `stop_gradient`."""
    images = keras.Input((6, 6, 1), name="images")
    sequence = keras.Input((4, 2), name="sequence")
    branches = [
        keras.layers.Conv2D(2, size, padding="same")(images)
        for size in (1, 3, 5)
    ]
    x = keras.layers.Concatenate()(branches)

    inner_inputs = keras.Input((6, 6, 6))
    inner = keras.layers.Conv2D(6, 3, padding="same", activation="tanh")(
        inner_inputs
    )
    inner = keras.layers.Add()([inner, inner_inputs])
    x = keras.Model(inner_inputs, inner, name="residual")(x)

    cut = keras.layers.Conv2D(6, 3, padding="same")(images)
    cut = keras.layers.Lambda(keras.ops.stop_gradient)(cut)
    x = keras.layers.Conv2D(2, 3, strides=2)(keras.layers.Add()([x, cut]))
    x = keras.layers.Flatten()(x)

    _, state_h, _ = keras.layers.LSTM(3, return_state=True)(sequence)
    x = keras.layers.Concatenate()([x, state_h])
    logits = keras.layers.Dense(3)(keras.layers.Dense(5, "tanh")(x))
    return keras.Model({"images": images, "sequence": sequence}, logits)


@pytest.mark.parametrize("overlap", [0, 1, 2, 5])
def test_branching_model_probe_any_overlap(overlap):
    """Waiting for an earlier block changes neither the probe nor the
    update of a `fit` step on a model with branches, shared inputs, a layer
    with several outputs and a layer that the loss does not reach."""
    network = branching_model()
    rng = np.random.default_rng(15)
    x = {
        "images": rng.normal(size=(9, 6, 6, 1)).astype(np.float32),
        "sequence": rng.normal(size=(9, 4, 2)).astype(np.float32),
    }
    y = rng.integers(0, 3, size=9).astype(np.int32)
    expected = single_example_gram(network, x, y)
    plain = branching_model()
    plain.set_weights(network.get_weights())
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    model = FisherModel(network, fisher_interval=1, block_overlap=overlap)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)

    with warnings.catch_warnings():
        # The LSTM has no closed form, and the cut convolution no gradient.
        warnings.simplefilter("ignore")
        expected_changes = one_step_update(plain, x, y)
        changes = one_step_update(model, x, y)

    recorded = model.read_probe_values()
    assert recorded["trace"] == pytest.approx(np.trace(expected), rel=RTOL)
    assert recorded["lambda_max"] == pytest.approx(
        np.linalg.eigvalsh(expected)[-1], rel=RTOL
    )
    for change, reference in zip(changes, expected_changes, strict=True):
        np.testing.assert_allclose(
            change, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max()
        )


# BatchNormalization: the per-layer tape is the reference.


def test_batch_norm_closed_form_matches_tape():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.BatchNormalization(center=False)(x)
    logits = keras.layers.Dense(3)(x)
    model = keras.Model(inputs, logits)
    x, y = random_batch((6, 6, 3), 7, 3, seed=8)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        gram.gram_matrix(model, LOSS, x, y, method="tape"),
    )


# Layers without a closed form.


def fallback_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)(inputs)
    x = keras.layers.DepthwiseConv2D(2)(x)
    x = keras.layers.Reshape((25, 4))(x)
    x = keras.layers.Conv1D(3, 2, activation="relu")(x)
    x = keras.layers.LayerNormalization()(x)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    return keras.Model(inputs, logits)


def test_fallback_layers_match_loop_and_warn_once(monkeypatch):
    monkeypatch.setattr(gram, "_warned_layer_classes", set())
    model = fallback_model()
    x, y = random_batch((8, 8, 2), 5, 3, seed=9)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = gram.gram_matrix(model, LOSS, x, y)
        second = gram.gram_matrix(model, LOSS, x, y)

    messages = [str(w.message) for w in caught]
    for name in ("DepthwiseConv2D", "Conv1D", "LayerNormalization"):
        naming = [m for m in messages if f"class {name} " in m]
        assert len(naming) == 1, (name, messages)
    assert len(messages) == 3, messages
    expected = single_example_gram(model, x, y)
    assert_gram_close(first, expected)
    assert_gram_close(second, expected)


def test_fallback_warns_for_each_conv2d_setting(monkeypatch):
    """Two Conv2D layers that take the tape for different settings each get
    a warning that names the setting."""
    monkeypatch.setattr(gram, "_warned_layer_classes", set())
    inputs = keras.Input((6, 6, 4))
    x = keras.layers.Conv2D(4, 3, groups=2)(inputs)
    x = keras.layers.Permute((3, 1, 2))(x)
    x = keras.layers.Conv2D(2, 2, data_format="channels_first")(x)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, logits)
    x, y = random_batch((6, 6, 4), 5, 3, seed=4)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = gram.gram_matrix(model, LOSS, x, y)
    messages = [str(w.message) for w in caught if "tf_fisher" in str(w.message)]
    assert len(messages) == 2, messages
    # Backprop forms the later layer's block first.
    channels_first, grouped = messages
    assert "class Conv2D with groups=2 (first seen" in grouped
    assert (
        "class Conv2D with data_format='channels_first' (first seen"
        in channels_first
    )
    assert_gram_close(actual, single_example_gram(model, x, y))


# The package's models and a model built from standard Keras layers.


def test_mlp_matches_loop(digits):
    model = models.build_model("mlp", digits.input_shape, 10, seed=1)
    x, y = digit_batch(digits, 6)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        single_example_gram(model, x, y),
    )


@pytest.mark.parametrize(
    "name, channels, batch",
    [("resnet8", 1, 6), ("resnet8", 1, 18), ("densenet8", 1, 6),
     ("resnet20", 3, 4)],
)
def test_package_model_with_batch_norm_matches_tape(
    digits, name, channels, batch
):
    input_shape = digits.input_shape[:2] + (channels,)
    model = models.build_model(name, input_shape, 10, seed=2)
    x, y = digit_batch(digits, batch, channels)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        gram.gram_matrix(model, LOSS, x, y, method="tape"),
    )


def user_model(seed=0):
    """Standard Keras layers with activations inside Conv2D and Dense."""
    initializer = keras.initializers.GlorotUniform(seed)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(
        6, 3, activation="relu", kernel_initializer=initializer
    )(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(
        8, 3, strides=2, padding="same", activation="tanh"
    )(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="sigmoid")(x)
    logits = keras.layers.Dense(5)(x)
    return keras.Model(inputs, logits)


def test_user_model_matches_loop():
    model = user_model()
    x, y = random_batch((12, 12, 3), 20, 5, seed=10)
    assert_gram_close(
        fast_gram_without_warnings(model, x, y),
        single_example_gram(model, x, y),
    )


# The training step.


def one_step_update(model, x, y):
    """Run one fit step on (x, y) and return the weight changes."""
    before = [w.numpy() for w in model.trainable_weights]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(y))
    model.fit(dataset, epochs=1, verbose=0)
    return [w.numpy() - b for w, b in zip(model.trainable_weights, before)]


@pytest.mark.parametrize("route", MATERIALISED_ROUTES)
@pytest.mark.parametrize("regularised", [False, True])
def test_probed_step_applies_plain_keras_update(
    route, regularised, route_calls
):
    """A probed step takes the kernel gradients of materialised layers from
    the probe; its update must still equal that of a plain Keras step. With
    a kernel regulariser the probe's gradients would miss the penalty, so
    the step keeps the backward pass's gradients."""
    input_shape, filters, _ = ROUTE_SHAPES[route]

    def network():
        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu",
            kernel_regularizer="l2" if regularised else None,
        )(inputs)
        x = keras.layers.BatchNormalization()(x)
        logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
        return keras.Model(inputs, logits)

    plain = network()
    probed_network = network()
    probed_network.set_weights(plain.get_weights())
    probed = FisherModel(probed_network, fisher_interval=1)
    for model in (plain, probed):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = random_batch(input_shape, 20, 3, seed=11)

    expected = one_step_update(plain, x, y)
    actual = one_step_update(probed, x, y)
    assert np.isfinite(probed.read_probe_values()["trace"])
    assert_route_taken(route, route_calls)
    for change, reference in zip(actual, expected, strict=True):
        np.testing.assert_allclose(
            change, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max()
        )


BATCH_NORM_SETTINGS = {
    "default": {},
    "without_center": {"center": False},
    "without_scale": {"scale": False},
    "channel_axis_1": {"axis": 1},
    "regularised": {"gamma_regularizer": "l2", "beta_regularizer": "l2"},
    "momentum_and_epsilon": {"momentum": 0.5, "epsilon": 0.3},
    "frozen_gamma": {},
    "on_vectors": {},
}


def batch_norm_network(setting):
    """Conv2D (or Dense), a BatchNormalization set up as `setting` names,
    ReLU and Dense logits; γ, β and the moving statistics start away from
    their defaults."""
    inputs = keras.Input((6, 6, 2))
    if setting == "on_vectors":
        x = keras.layers.Dense(7)(keras.layers.Flatten()(inputs))
    else:
        x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    layer = keras.layers.BatchNormalization(
        gamma_initializer="random_uniform",
        beta_initializer="random_uniform",
        moving_mean_initializer="random_uniform",
        moving_variance_initializer="ones",
        **BATCH_NORM_SETTINGS[setting],
    )
    x = keras.layers.ReLU()(layer(x))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    if setting == "frozen_gamma":
        layer.gamma.trainable = False
    return keras.Model(inputs, logits)


def batch_norm_statistics(network):
    return [
        (layer.moving_mean.numpy(), layer.moving_variance.numpy())
        for layer in network.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@pytest.mark.parametrize("setting", BATCH_NORM_SETTINGS)
def test_fused_batch_norm_matches_keras(setting, monkeypatch):
    """In a probed step, `GramTaps.batch_norm` runs BatchNormalization with
    its own backward pass. The update and the moving statistics must equal
    those of a plain Keras step, and the recorded spectrum that of the
    per-layer tape, which calls the Keras layer."""
    fused_calls = []
    original = gram.GramTaps.batch_norm

    def counting(self, layer, inputs):
        fused_calls.append(layer.name)
        return original(self, layer, inputs)

    monkeypatch.setattr(gram.GramTaps, "batch_norm", counting)
    plain = batch_norm_network(setting)
    probed_network = batch_norm_network(setting)
    probed_network.set_weights(plain.get_weights())
    reference = batch_norm_network(setting)
    reference.set_weights(plain.get_weights())
    x, y = random_batch((6, 6, 2), 10, 3, seed=16)
    expected_spectrum = measures.spectrum_statistics(
        gram.gram_matrix(reference, LOSS, x, y, method="tape")
    )
    assert not fused_calls
    probed = FisherModel(probed_network, fisher_interval=1)
    for model in (plain, probed):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)

    expected = one_step_update(plain, x, y)
    actual = one_step_update(probed, x, y)
    assert len(fused_calls) == 1
    # The bias of the layer before BatchNormalization has a zero gradient
    # up to round-off, so the floor is relative to the largest change.
    scale = max(np.abs(change).max() for change in expected)
    for change, reference_change in zip(actual, expected, strict=True):
        np.testing.assert_allclose(
            change, reference_change, rtol=RTOL, atol=RTOL * scale
        )
    for (mean, variance), (expected_mean, expected_variance) in zip(
        batch_norm_statistics(probed_network),
        batch_norm_statistics(plain),
        strict=True,
    ):
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
        np.testing.assert_allclose(variance, expected_variance, rtol=1e-6)
    recorded = probed.read_probe_values()
    for key in ("trace", "lambda_max", "lambda_min", "condition_number"):
        assert recorded[key] == pytest.approx(
            float(expected_spectrum[key]), rel=RTOL
        ), key


@pytest.mark.parametrize("option", ["renorm", "synchronized"])
def test_batch_norm_option_is_rejected(option):
    """A BatchNormalization layer with renorm or synchronisation has no
    per-example form; the probed step must raise, naming the option."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.BatchNormalization(**{option: True})(inputs)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = FisherModel(keras.Model(inputs, logits), fisher_interval=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = random_batch((6, 6, 2), 4, 3, seed=17)
    with pytest.raises(NotImplementedError, match=f"{option}=True"):
        one_step_update(model, x, y)


@pytest.mark.parametrize("build", [user_model, fallback_model])
def test_probe_in_training_step_matches_loop(build, monkeypatch):
    """The compiled probed step, with an unknown batch size, records the
    spectrum of J Jᵀ from single-example gradients."""
    monkeypatch.setattr(gram, "_warned_layer_classes", set())
    network = build()
    input_shape = network.input_shape[1:]
    x, y = random_batch(input_shape, 19, network.output_shape[-1], seed=12)
    expected = measures.spectrum_statistics(
        tf.constant(single_example_gram(network, x, y))
    )
    model = FisherModel(network, fisher_interval=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_step_update(model, x, y)
    recorded = model.read_probe_values()
    for key in ("trace", "lambda_max", "lambda_min", "condition_number"):
        assert recorded[key] == pytest.approx(
            float(expected[key]), rel=RTOL
        ), key
    assert recorded["rank"] == float(expected["rank"])
    assert recorded["batch_size"] == 19


def two_input_model():
    """A Functional model with two named inputs."""
    images = keras.Input((6, 6, 1), name="images")
    features = keras.Input((3,), name="features")
    x = keras.layers.Conv2D(2, 3, activation="relu")(images)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Concatenate()([x, features])
    logits = keras.layers.Dense(3)(keras.layers.Dense(4, "tanh")(x))
    return keras.Model([images, features], logits)


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_two_input_model_matches_loop(structure):
    """Inputs passed as a list and as a dict keyed by input name, to
    `gram_matrix` and to the probe of a `fit` step."""
    network = two_input_model()
    rng = np.random.default_rng(13)
    images = rng.normal(size=(7, 6, 6, 1)).astype(np.float32)
    features = rng.normal(size=(7, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=7).astype(np.int32)
    expected = single_example_gram(network, [images, features], y)
    if structure == "list":
        x = [images, features]
    else:
        x = {"images": images, "features": features}

    assert_gram_close(gram.gram_matrix(network, LOSS, x, y), expected)
    assert_gram_close(gram.loop_gram_matrix(network, LOSS, x, y), expected)
    model = FisherModel(network, fisher_interval=1)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    model.fit(x, y, batch_size=7, epochs=1, verbose=0, shuffle=False)
    recorded = model.read_probe_values()
    assert recorded["trace"] == pytest.approx(np.trace(expected), rel=RTOL)
    assert recorded["lambda_max"] == pytest.approx(
        np.linalg.eigvalsh(expected)[-1], rel=RTOL
    )
