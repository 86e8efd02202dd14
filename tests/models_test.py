"""Tests for the MLP, ResNet and DenseNet builders in tf_fisher.models."""

import itertools
import math

import keras
import numpy as np
import pytest

from tf_fisher import models

# Layers a model may contain; only the first three may hold weights.
WEIGHTED_LAYERS = (
    keras.layers.Conv2D,
    keras.layers.Dense,
    keras.layers.BatchNormalization,
)
WEIGHTLESS_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Add,
    keras.layers.Concatenate,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.Flatten,
    models.ChannelPad,
)

# Published counts from Liao et al., "Approximate Fisher Information Matrix
# to Characterise the Training of Deep Neural Networks", TPAMI 2020.
PAPER_COUNTS = {
    "mlp": 770_000,
    "resnet8": 70_000,
    "resnet110": 1_730_000,
    "densenet8": 10_000,
    "densenet110": 1_770_000,
}


def mlp_count(input_size, hidden, classes):
    """Count MLP weights and biases layer by layer."""
    widths = [input_size, *hidden, classes]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def resnet_count(in_channels, units_per_stage, classes):
    """Count ResNet weights: convs, BN gamma and beta, head BN, Dense."""
    total = 9 * in_channels * 16 + 2 * 16
    channels = 16
    for filters in (16, 32, 64):
        for _ in range(units_per_stage):
            total += 9 * channels * filters + 2 * filters
            total += 9 * filters * filters + 2 * filters
            channels = filters
    total += 2 * channels
    return total + channels * classes + classes


def densenet_count(in_channels, growth_rates, layers_per_block, classes):
    """Count DenseNet weights: stem, dense layers, transitions, head."""
    total = 9 * in_channels * 16
    channels = 16
    for block, rate in enumerate(growth_rates):
        for _ in range(layers_per_block):
            total += 2 * channels + 9 * channels * rate
            channels += rate
        if block < len(growth_rates) - 1:
            total += 2 * channels + channels * channels
    total += 2 * channels
    return total + channels * classes + classes


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def resnet110():
    return models.build_model("resnet110", (32, 32, 3), 10, seed=1)


@pytest.fixture(scope="module")
def densenet110():
    return models.build_model("densenet110", (32, 32, 3), 10, seed=1)


@pytest.fixture(scope="module")
def resnet8():
    return models.build_model("resnet8", (32, 32, 1), 10, seed=1)


def test_mlp_count_closed_form():
    model = models.build_model("mlp", (32, 32, 1), 10)
    assert trainable_count(model) == 768_010
    assert trainable_count(model) == mlp_count(32 * 32, (500, 500), 10)
    small = models.build_model("mlp", (28, 28, 1), 10)
    assert trainable_count(small) == 648_010
    assert trainable_count(small) == mlp_count(28 * 28, (500, 500), 10)


def test_resnet_counts_closed_form(resnet110):
    resnet8 = models.build_model("resnet8", (32, 32, 1), 10)
    resnet20 = models.build_model("resnet20", (32, 32, 3), 10)
    assert trainable_count(resnet8) == resnet_count(1, 1, 10)
    assert trainable_count(resnet20) == resnet_count(3, 3, 10)
    assert trainable_count(resnet110) == resnet_count(3, 18, 10)


def test_densenet_counts_closed_form(densenet110):
    densenet8 = models.build_model("densenet8", (32, 32, 1), 10)
    assert trainable_count(densenet8) == densenet_count(1, (8, 10, 14), 1, 10)
    expected = densenet_count(3, (8, 10, 14), 18, 10)
    assert trainable_count(densenet110) == expected


def test_counts_near_paper(resnet110, densenet110):
    built = {
        "mlp": models.build_model("mlp", (32, 32, 1), 10),
        "resnet8": models.build_model("resnet8", (32, 32, 1), 10),
        "resnet110": resnet110,
        "densenet8": models.build_model("densenet8", (32, 32, 1), 10),
        "densenet110": densenet110,
    }
    for name, model in built.items():
        relative = trainable_count(model) / PAPER_COUNTS[name] - 1.0
        assert abs(relative) < 0.10, (name, trainable_count(model))


def test_densenet110_count_100_classes():
    model = models.build_model("densenet110", (32, 32, 3), 100)
    count = trainable_count(model)
    assert count == densenet_count(3, (8, 10, 14), 18, 100)
    assert abs(count / PAPER_COUNTS["densenet110"] - 1.0) < 0.10


def test_uniform_growth_misses_paper_count():
    # The per-block growth rates are the reading that fits 1.77 M; a single
    # rate of 10 falls outside 10%, which the closed form confirms.
    model = models.densenet(110, 10, (32, 32, 3), 10)
    assert trainable_count(model) == densenet_count(3, (10, 10, 10), 18, 10)
    relative = trainable_count(model) / PAPER_COUNTS["densenet110"] - 1.0
    assert relative < -0.10


@pytest.mark.parametrize(
    "name, input_shape, classes",
    [
        ("mlp", (28, 28, 1), 10),
        ("resnet8", (28, 28, 1), 10),
        ("resnet8", (30, 30, 3), 7),
        ("resnet20", (32, 32, 3), 100),
        ("densenet8", (28, 28, 1), 10),
    ],
)
def test_output_shape_small_models(name, input_shape, classes):
    model = models.build_model(name, input_shape, classes, seed=0)
    images = np.random.default_rng(0).normal(size=(3, *input_shape))
    logits = model(images.astype("float32"), training=False)
    assert model.name == name
    assert tuple(logits.shape) == (3, classes)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


def test_output_shape_deep_models(resnet110, densenet110):
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    images = images.astype("float32")
    for model in (resnet110, densenet110):
        logits = model(images, training=True)
        assert tuple(logits.shape) == (2, 10)
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(logits)))


def test_models_are_functional(resnet110, densenet110):
    names = set(models.MODEL_NAMES)
    assert names == {
        "mlp", "resnet8", "resnet20", "resnet110", "densenet8", "densenet110"
    }
    for model in (resnet110, densenet110):
        assert type(model).__name__ == "Functional"
        assert not isinstance(model, keras.Sequential)


def test_layer_types_restricted(resnet110, densenet110):
    mlp = models.build_model("mlp", (32, 32, 1), 10)
    for model in (mlp, resnet110, densenet110):
        for layer in model.layers:
            if layer.weights:
                assert isinstance(layer, WEIGHTED_LAYERS), layer.name
            else:
                assert isinstance(layer, WEIGHTLESS_LAYERS), layer.name


def test_conv_and_dense_are_linear(resnet110, densenet110):
    for model in (resnet110, densenet110):
        for layer in model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                assert not layer.use_bias, layer.name
                assert layer.padding == "same", layer.name
                assert layer.data_format == "channels_last", layer.name
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
                activation = keras.activations.serialize(layer.activation)
                assert activation == "linear", layer.name
        last = model.layers[-1]
        assert isinstance(last, keras.layers.Dense)
        assert last.units == 10


def test_batch_norm_starts_at_identity(densenet110):
    for layer in densenet110.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
            assert np.all(gamma == 1.0), layer.name
            assert np.all(beta == 0.0), layer.name


def test_big_conv_kernel_std(resnet110):
    kernel = resnet110.get_layer("stage3_unit5_conv1").kernel.numpy()
    assert kernel.shape == (3, 3, 64, 64)
    expected_std = math.sqrt(2.0 / (3 * 3 * 64))
    # Standard error of a sample std is about std / sqrt(2 N), 0.4% here.
    assert abs(kernel.std() / expected_std - 1.0) < 0.03
    assert abs(kernel.mean()) < 5 * expected_std / math.sqrt(kernel.size)


def test_every_conv_kernel_std(densenet110):
    for layer in densenet110.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        kernel = layer.kernel.numpy()
        k = kernel.shape[0]
        expected_std = math.sqrt(2.0 / (k * k * layer.filters))
        tolerance = 5.0 / math.sqrt(2 * kernel.size)
        assert abs(kernel.std() / expected_std - 1.0) < tolerance, layer.name


def test_dense_kernel_torch_uniform():
    model = models.build_model("mlp", (32, 32, 1), 10, seed=3)
    kernel = model.get_layer("dense1").kernel.numpy()
    bound = 1.0 / math.sqrt(32 * 32)
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound
    assert abs(kernel.std() / (bound / math.sqrt(3.0)) - 1.0) < 0.01
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            assert np.all(layer.bias.numpy() == 0.0), layer.name


def test_resnet110_layer_structure(resnet110):
    layers = resnet110.layers
    convs = [x for x in layers if isinstance(x, keras.layers.Conv2D)]
    adds = [x for x in layers if isinstance(x, keras.layers.Add)]
    pads = [x for x in layers if isinstance(x, models.ChannelPad)]
    assert len(convs) == 109
    assert len(adds) == 54
    assert [pad.pad_channels for pad in pads] == [16, 32]


def source_layers(node_config):
    """Return the producer layer names in a serialized inbound node."""
    if isinstance(node_config, (list, tuple)):
        return [name for item in node_config for name in source_layers(item)]
    if not isinstance(node_config, dict):
        return []
    if node_config.get("class_name") == "__keras_tensor__":
        return [node_config["config"]["keras_history"][0]]
    return [
        name for value in node_config.values()
        for name in source_layers(value)
    ]


def test_no_relu_after_addition(resnet8):
    inbound = {
        layer["name"]: source_layers(layer["inbound_nodes"])
        for layer in resnet8.get_config()["layers"]
    }
    add_names = {
        layer.name for layer in resnet8.layers
        if isinstance(layer, keras.layers.Add)
    }
    relu_names = [
        layer.name for layer in resnet8.layers
        if isinstance(layer, keras.layers.ReLU)
    ]
    assert len(add_names) == 3
    assert "stage1_unit1_relu" in relu_names
    assert inbound["stage1_unit1_relu"] == ["stage1_unit1_bn1"]
    for name in relu_names:
        assert not set(inbound[name]) & add_names, name


def test_densenet110_layer_structure(densenet110):
    layers = densenet110.layers
    convs = [x for x in layers if isinstance(x, keras.layers.Conv2D)]
    concats = [x for x in layers if isinstance(x, keras.layers.Concatenate)]
    assert len(convs) == 1 + 54 + 2
    assert len(concats) == 54
    pooled = densenet110.get_layer("head_pool").output
    assert pooled.shape[-1] == 16 + 18 * 8 + 18 * 10 + 18 * 14


def test_shortcut_pads_zero_channels(resnet8):
    unit_input = resnet8.get_layer("stage1_unit1_add").output
    padded = resnet8.get_layer("stage2_unit1_shortcut_pad").output
    probe = keras.Model(resnet8.input, [unit_input, padded])
    images = np.random.default_rng(5).normal(size=(2, 32, 32, 1))
    before, after = probe(images.astype("float32"), training=False)
    before = keras.ops.convert_to_numpy(before)
    after = keras.ops.convert_to_numpy(after)

    assert before.shape == (2, 32, 32, 16)
    assert after.shape == (2, 16, 16, 32)
    assert np.all(after[..., 16:] == 0.0)
    pooled = before.reshape(2, 16, 2, 16, 2, 16).mean(axis=(2, 4))
    np.testing.assert_allclose(after[..., :16], pooled, rtol=1e-5, atol=1e-6)
    assert np.abs(after[..., :16]).max() > 0.0


def test_channel_pad_layer():
    values = np.arange(2 * 3 * 3 * 4, dtype="float32").reshape(2, 3, 3, 4)
    layer = models.ChannelPad(5)
    output = keras.ops.convert_to_numpy(layer(values))
    expected = np.concatenate([values, np.zeros((2, 3, 3, 5))], axis=-1)
    np.testing.assert_array_equal(output, expected)
    assert layer.compute_output_shape((None, 3, 3, 4)) == (None, 3, 3, 9)
    assert not layer.weights

    restored = models.ChannelPad.from_config(layer.get_config())
    assert restored.pad_channels == 5
    with pytest.raises(ValueError, match="pad_channels=-1"):
        models.ChannelPad(-1)


def test_saved_model_round_trip(resnet8, tmp_path):
    path = tmp_path / "resnet8.keras"
    resnet8.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 1))
    images = images.astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images, training=False)),
        keras.ops.convert_to_numpy(resnet8(images, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_seed_repeats_weights():
    first = models.build_model("resnet8", (28, 28, 1), 10, seed=7)
    second = models.build_model("resnet8", (28, 28, 1), 10, seed=7)
    other = models.build_model("resnet8", (28, 28, 1), 10, seed=8)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    kernel = first.get_layer("stage1_unit1_conv1").kernel.numpy()
    other_kernel = other.get_layer("stage1_unit1_conv1").kernel.numpy()
    assert not np.array_equal(kernel, other_kernel)


def test_seed_differs_between_layers():
    # Same-shaped layers must not share values when one seed is given.
    model = models.build_model("resnet8", (28, 28, 1), 10, seed=7)
    conv1 = model.get_layer("stage1_unit1_conv1").kernel.numpy()
    conv2 = model.get_layer("stage1_unit1_conv2").kernel.numpy()
    assert conv1.shape == conv2.shape
    assert not np.array_equal(conv1, conv2)


def test_unknown_name_lists_names():
    with pytest.raises(ValueError) as error:
        models.build_model("resnet18", (32, 32, 3), 10)
    message = str(error.value)
    assert "'resnet18'" in message
    for name in models.MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: models.resnet(9, (32, 32, 3), 10), "depth=9"),
        (lambda: models.densenet(110, (8, 10), (32, 32, 3), 10),
         "growth_rate=(8, 10)"),
        (lambda: models.densenet(8, 0, (32, 32, 3), 10), "growth_rate"),
        (lambda: models.mlp((32, 32), 10), "input_shape=(32, 32)"),
        (lambda: models.build_model("mlp", (32, 32, 1), 0),
         "num_classes=0"),
    ],
)
def test_invalid_arguments_raise(build, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")
                       .replace(")", r"\)")):
        build()
