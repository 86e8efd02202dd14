"""Keras 3 functional models (MLP, ResNet, DenseNet) for the Fisher measures.

The architectures are those of Z. Liao, T. Drummond, I. Reid and G. Carneiro,
"Approximate Fisher Information Matrix to Characterise the Training of Deep
Neural Networks", IEEE TPAMI 42(1), 2020, with the details that the paper
leaves open taken from the authors' public Lua Torch code
(github.com/zhibinliao89/fisher.info.mat.torch, `models/cbrcbresnet.lua`,
`models/densenet.lua`, `models/DenseConnectLayer.lua`).

Every model is a functional `keras.Model` built only from standard layers
(`Conv2D`, `BatchNormalization`, `ReLU`, `Add`, `Concatenate`,
`AveragePooling2D`, `GlobalAveragePooling2D`, `Flatten`, `Dense`) plus the
weightless `ChannelPad`, so code that computes per-example gradients can walk
the graph layer by layer. Activations are separate layers, convolutions have
no bias, and the last layer is a linear `Dense(num_classes)` that returns
logits, to be trained with `SparseCategoricalCrossentropy(from_logits=True)`.

Initialisation follows the authors' code: convolution kernels are drawn from
N(0, 2 / (k * k * filters)), BatchNormalization starts at gamma = 1 and
beta = 0, and Dense layers use the Torch 7 `nn.Linear` default
U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)) for the kernel with a zero bias.
BatchNormalization uses the Torch 7 defaults epsilon = 1e-5 and a moving
average momentum of 0.9 (Torch's 0.1).

The table lists trainable parameter counts, which leave out the
BatchNormalization moving statistics as Torch does. `tests/models_test.py`
checks them against closed forms. The numbers published by Liao et al. are
in brackets.

| model | input | classes | parameters |
| --- | --- | --- | --- |
| mlp | 32 x 32 x 1 | 10 | 768,010 (0.77 M) |
| mlp | 28 x 28 x 1 | 10 | 648,010 |
| resnet8 | 32 x 32 x 1 | 10 | 75,130 (about 70 k) |
| resnet20 | 32 x 32 x 3 | 10 | 269,850 |
| resnet110 | 32 x 32 x 3 | 10 | 1,728,090 (1.73 M) |
| densenet8 | 32 x 32 x 1 | 10 | 10,322 (about 10 k) |
| densenet110 | 32 x 32 x 3 | 10 | 1,724,890 (1.77 M) |
| densenet110 | 32 x 32 x 3 | 100 | 1,778,260 (1.77 M) |
"""

import math
from collections.abc import Callable
from collections.abc import Sequence

import keras
import numpy as np

MODEL_NAMES = (
    "mlp",
    "resnet8",
    "resnet20",
    "resnet110",
    "densenet8",
    "densenet110",
)

# Growth rates of the three dense blocks, hard-coded in the authors' DenseNet
# for CIFAR-10 and CIFAR-100. With them DenseNet-110 has 1,724,890 parameters
# for 10 classes and 1,778,260 for 100 classes. A single growth rate misses
# the published 1.77 M by more than 10%: 8 gives 1.04 M, 10 gives 1.58 M and
# 12 gives 2.25 M (10 classes).
DENSENET_GROWTH_RATES = (8, 10, 14)

STEM_FILTERS = 16
RESNET_STAGE_FILTERS = (16, 32, 64)

# Torch 7 BatchNormalization defaults: eps = 1e-5 and a running-average
# update weight of 0.1, which is Keras momentum 0.9.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

SeedFn = Callable[[], int | None]


@keras.saving.register_keras_serializable(package="tf_fisher")
class ChannelPad(keras.layers.Layer):
    """Layer that appends zero channels after the input channels.

    It is the channel half of the parameter-free ResNet shortcut: the input
    channels pass through unchanged and `pad_channels` zero channels follow
    them on the last axis. The layer has no weights.

    Args:
        pad_channels: number of zero channels appended, a non-negative int.
        **kwargs: passed to `keras.layers.Layer`.

    Input shape: `[batch, height, width, channels]`.
    Output shape: `[batch, height, width, channels + pad_channels]`.
    """

    def __init__(self, pad_channels: int, **kwargs):
        super().__init__(**kwargs)
        is_int = isinstance(pad_channels, (int, np.integer)) and not (
            isinstance(pad_channels, bool)
        )
        if not is_int or pad_channels < 0:
            raise ValueError(
                "ChannelPad expected pad_channels to be a non-negative "
                f"integer. Received: pad_channels={pad_channels!r}"
            )
        self.pad_channels = int(pad_channels)

    def call(self, inputs):
        rank = len(inputs.shape)
        pad_width = [[0, 0]] * (rank - 1) + [[0, self.pad_channels]]
        return keras.ops.pad(inputs, pad_width)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        if channels is not None:
            channels += self.pad_channels
        return tuple(input_shape[:-1]) + (channels,)

    def get_config(self):
        config = super().get_config()
        config["pad_channels"] = self.pad_channels
        return config


def _make_seed_fn(seed: int | None) -> SeedFn:
    """Return a function that gives a fresh initializer seed per call.

    A Keras initializer built with an integer seed draws the same values on
    every call, so each layer gets its own seed, drawn from one NumPy
    generator seeded with `seed`. With `seed=None` every call returns None
    and Keras draws from its global generator, which
    `keras.utils.set_random_seed` controls.
    """
    if seed is None:
        return lambda: None
    generator = np.random.default_rng(seed)
    return lambda: int(generator.integers(0, 2**31 - 1))


def _conv(filters: int, kernel_size: int, strides: int, seed_fn: SeedFn,
          name: str) -> keras.layers.Conv2D:
    """Build a bias-free `Conv2D` with kernel ~ N(0, 2 / (k * k * filters))."""
    stddev = math.sqrt(2.0 / (kernel_size * kernel_size * filters))
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        data_format="channels_last",
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(
            stddev=stddev, seed=seed_fn()
        ),
        name=name,
    )


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    """Build a `BatchNormalization` with gamma = 1, beta = 0, Torch defaults."""
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )


def _dense(units: int, seed_fn: SeedFn, name: str) -> keras.layers.Dense:
    """Build a linear `Dense` with the Torch 7 `nn.Linear` kernel default.

    VarianceScaling(scale=1/3, fan_in, uniform) is U(-a, a) with
    a = sqrt(3 * scale / fan_in) = 1 / sqrt(fan_in).
    """
    return keras.layers.Dense(
        units,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0,
            mode="fan_in",
            distribution="uniform",
            seed=seed_fn(),
        ),
        bias_initializer="zeros",
        name=name,
    )


def _check_positive_int(value, argument: str, function: str) -> None:
    """Raise ValueError unless `value` is a positive int."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(
        value, bool
    )
    if not is_int or value < 1:
        raise ValueError(
            f"{function} expected {argument} to be a positive integer. "
            f"Received: {argument}={value!r}"
        )


def _check_input_shape(input_shape, function: str) -> None:
    """Raise ValueError unless `input_shape` is (height, width, channels)."""
    if not isinstance(input_shape, Sequence) or len(input_shape) != 3:
        raise ValueError(
            f"{function} expected input_shape to be (height, width, "
            f"channels), for example (32, 32, 3). Received: "
            f"input_shape={input_shape!r}"
        )
    for size in input_shape:
        _check_positive_int(size, "input_shape entries", function)


def _check_depth(depth, function: str) -> int:
    """Return n = (depth - 2) / 6 after checking that depth is 6n + 2."""
    _check_positive_int(depth, "depth", function)
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"{function} expected depth = 6n + 2 with n >= 1 (8, 14, 20, "
            f"..., 110). Received: depth={depth}"
        )
    return (depth - 2) // 6


def mlp(input_shape: tuple[int, int, int], num_classes: int,
        seed: int | None = None,
        hidden_units: Sequence[int] = (500, 500)) -> keras.Model:
    """Build the multilayer perceptron: Flatten, Dense-ReLU per hidden layer.

    With the default two hidden layers of 500 units and a 32 x 32 x 1 input
    the model has 1024 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10 =
    768,010 parameters for 10 classes, the 0.77 M of Liao et al. (2020).

    Args:
        input_shape: (height, width, channels) of one example.
        num_classes: number of logits returned.
        seed: seeds the Dense initializers, or None for Keras's global
            generator (set it with `keras.utils.set_random_seed`).
        hidden_units: width of each hidden layer.

    NOTE: the authors' public code has no MLP, so its initialisation (the
    Torch 7 `nn.Linear` default with a zero bias, as in their ResNet and
    DenseNet heads) is an assumption.

    Returns:
        A functional model named "mlp" mapping
        `[batch, height, width, channels]` to logits `[batch, num_classes]`.
    """
    _check_input_shape(input_shape, "mlp")
    _check_positive_int(num_classes, "num_classes", "mlp")
    for units in hidden_units:
        _check_positive_int(units, "hidden_units entries", "mlp")
    seed_fn = _make_seed_fn(seed)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for index, units in enumerate(hidden_units, start=1):
        x = _dense(units, seed_fn, name=f"dense{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    logits = _dense(num_classes, seed_fn, name="logits")(x)
    return keras.Model(inputs, logits, name="mlp")


def _residual_shortcut(x, filters: int, strides: int, name: str):
    """Apply the parameter-free shortcut: 2 x 2 average pool, zero channels.

    Pooling uses "same" padding so that its output size, ceil(size / 2),
    matches the strided "same" convolution on odd sizes too.
    """
    if strides == 2:
        x = keras.layers.AveragePooling2D(
            pool_size=2, strides=2, padding="same", name=f"{name}_pool"
        )(x)
    extra_channels = filters - x.shape[-1]
    if extra_channels > 0:
        x = ChannelPad(extra_channels, name=f"{name}_pad")(x)
    return x


def _residual_unit(x, filters: int, strides: int, seed_fn: SeedFn,
                   name: str):
    """Apply conv3x3-BN-ReLU-conv3x3-BN and add the shortcut, no final ReLU.

    NOTE: Keras "same" padding with stride 2 on an even size pads only the
    bottom and right, whereas the authors' Torch convolution pads one pixel
    on every side, so the sampling grid is shifted by one pixel.
    """
    residual = _conv(filters, 3, strides, seed_fn, f"{name}_conv1")(x)
    residual = _batch_norm(f"{name}_bn1")(residual)
    residual = keras.layers.ReLU(name=f"{name}_relu")(residual)
    residual = _conv(filters, 3, 1, seed_fn, f"{name}_conv2")(residual)
    residual = _batch_norm(f"{name}_bn2")(residual)
    shortcut = _residual_shortcut(x, filters, strides, f"{name}_shortcut")
    return keras.layers.Add(name=f"{name}_add")([residual, shortcut])


def resnet(depth: int, input_shape: tuple[int, int, int], num_classes: int,
           seed: int | None = None) -> keras.Model:
    """Build a CIFAR-style ResNet of depth 6n + 2 with 3 stages of n units.

    The layout is the authors' `cbrcbresnet.lua`: a conv3x3(16)-BN stem (no
    ReLU), then stages of 16, 32 and 64 filters with n residual units each,
    then BN-ReLU, global average pooling and a linear Dense layer. A unit is
    conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, with no ReLU after the
    addition. The first unit of stages 2 and 3 halves the resolution with a
    stride-2 convolution, and its shortcut is 2 x 2 average pooling followed
    by `ChannelPad`, so no shortcut has parameters. Depth 8 gives the
    3-unit MNIST ResNet-8, depth 20 the ResNet-20, depth 110 the 54-unit
    ResNet-110.

    Args:
        depth: 6n + 2 for n units per stage (8, 20, 110, ...).
        input_shape: (height, width, channels) of one example.
        num_classes: number of logits returned.
        seed: seeds the layer initializers, or None for Keras's global
            generator (set it with `keras.utils.set_random_seed`).

    Returns:
        A functional model named "resnet{depth}" mapping
        `[batch, height, width, channels]` to logits `[batch, num_classes]`.
    """
    function = f"resnet(depth={depth})"
    units_per_stage = _check_depth(depth, function)
    _check_input_shape(input_shape, function)
    _check_positive_int(num_classes, "num_classes", function)
    seed_fn = _make_seed_fn(seed)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv(STEM_FILTERS, 3, 1, seed_fn, "stem_conv")(inputs)
    x = _batch_norm("stem_bn")(x)
    for stage, filters in enumerate(RESNET_STAGE_FILTERS, start=1):
        for unit in range(1, units_per_stage + 1):
            strides = 2 if stage > 1 and unit == 1 else 1
            name = f"stage{stage}_unit{unit}"
            x = _residual_unit(x, filters, strides, seed_fn, name)
    x = _batch_norm("head_bn")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    logits = _dense(num_classes, seed_fn, name="logits")(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}")


def _dense_layer(x, growth_rate: int, seed_fn: SeedFn, name: str):
    """Apply BN-ReLU-conv3x3(growth_rate) and concatenate it to the input."""
    new_features = _batch_norm(f"{name}_bn")(x)
    new_features = keras.layers.ReLU(name=f"{name}_relu")(new_features)
    new_features = _conv(growth_rate, 3, 1, seed_fn, f"{name}_conv")(
        new_features
    )
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")(
        [x, new_features]
    )


def _transition(x, seed_fn: SeedFn, name: str):
    """Apply BN-ReLU-conv1x1 (same channel count) and 2 x 2 average pooling."""
    x = _batch_norm(f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = _conv(x.shape[-1], 1, 1, seed_fn, f"{name}_conv")(x)
    return keras.layers.AveragePooling2D(
        pool_size=2, strides=2, name=f"{name}_pool"
    )(x)


def _block_growth_rates(growth_rate, function: str) -> tuple[int, int, int]:
    """Return one growth rate per dense block from an int or three ints."""
    if isinstance(growth_rate, (int, np.integer)) and not isinstance(
        growth_rate, bool
    ):
        growth_rate = (growth_rate,) * 3
    if not isinstance(growth_rate, Sequence) or len(growth_rate) != 3:
        raise ValueError(
            f"{function} expected growth_rate to be a positive integer or "
            f"three of them, one per dense block, for example (8, 10, 14). "
            f"Received: growth_rate={growth_rate!r}"
        )
    for rate in growth_rate:
        _check_positive_int(rate, "growth_rate entries", function)
    return tuple(int(rate) for rate in growth_rate)


def densenet(depth: int, growth_rate: int | Sequence[int],
             input_shape: tuple[int, int, int], num_classes: int,
             seed: int | None = None) -> keras.Model:
    """Build a CIFAR-style DenseNet with 3 dense blocks of (depth - 2) / 6.

    The layout is the authors' `densenet.lua` with its fixed options, which
    turn off the bottleneck, compression and dropout. A conv3x3(16) stem
    with no BN feeds three dense blocks. A transition, BN-ReLU-conv1x1
    keeping the channel count and then 2 x 2 average pooling, sits between
    consecutive blocks. The head is BN-ReLU, global average pooling and a
    linear Dense layer. A dense layer is BN-ReLU-conv3x3(growth)
    concatenated to its input.

    The authors count each dense layer as two layers, as a bottleneck
    DenseNet would have, so depth 110 gives 3 blocks of 18 dense layers and
    depth 8 gives 3 blocks of 1, which Liao et al. (2020) describe as "6
    dense layers in 3 blocks". Their CIFAR code sets the growth rate per
    block to 8, 10 and 14 (`DENSENET_GROWTH_RATES`); only that reading
    reaches the published 1.77 M parameters within 10% (1,724,890 for 10
    classes, 1,778,260 for 100), and the same rates give DenseNet-8 its
    10,322 parameters (published: about 10 k).

    Args:
        depth: 6n + 2 for n dense layers per block (8, 110, ...).
        growth_rate: filters added by each dense layer, one int for all
            blocks or three ints, one per block.
        input_shape: (height, width, channels) of one example.
        num_classes: number of logits returned.
        seed: seeds the layer initializers, or None for Keras's global
            generator (set it with `keras.utils.set_random_seed`).

    Returns:
        A functional model named "densenet{depth}" mapping
        `[batch, height, width, channels]` to logits `[batch, num_classes]`.
    """
    function = f"densenet(depth={depth})"
    layers_per_block = _check_depth(depth, function)
    block_growth_rates = _block_growth_rates(growth_rate, function)
    _check_input_shape(input_shape, function)
    _check_positive_int(num_classes, "num_classes", function)
    seed_fn = _make_seed_fn(seed)

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv(STEM_FILTERS, 3, 1, seed_fn, "stem_conv")(inputs)
    for block, rate in enumerate(block_growth_rates, start=1):
        for layer in range(1, layers_per_block + 1):
            name = f"block{block}_layer{layer}"
            x = _dense_layer(x, rate, seed_fn, name)
        if block < len(block_growth_rates):
            x = _transition(x, seed_fn, f"transition{block}")
    x = _batch_norm("head_bn")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    logits = _dense(num_classes, seed_fn, name="logits")(x)
    return keras.Model(inputs, logits, name=f"densenet{depth}")


def build_model(name: str, input_shape: tuple[int, int, int],
                num_classes: int, seed: int | None = None) -> keras.Model:
    """Build one of the models in `MODEL_NAMES`.

    Args:
        name: one of `MODEL_NAMES`: "mlp", "resnet8", "resnet20",
            "resnet110", "densenet8" or "densenet110". DenseNets use the
            per-block growth rates `DENSENET_GROWTH_RATES`.
        input_shape: (height, width, channels) of one example, for example
            (32, 32, 3) for CIFAR or (28, 28, 1) for MNIST.
        num_classes: number of logits returned.
        seed: seeds every initializer, so equal seeds give equal weights.
            With None, Keras's global generator draws the weights; seed it
            with `keras.utils.set_random_seed` for repeatable runs.

    Returns:
        A functional model named `name` mapping
        `[batch, height, width, channels]` to logits `[batch, num_classes]`.

    Raises:
        ValueError: for an unknown name or an invalid shape or class count.
    """
    if name == "mlp":
        return mlp(input_shape, num_classes, seed=seed)
    if name in ("resnet8", "resnet20", "resnet110"):
        depth = int(name.removeprefix("resnet"))
        return resnet(depth, input_shape, num_classes, seed=seed)
    if name in ("densenet8", "densenet110"):
        depth = int(name.removeprefix("densenet"))
        return densenet(
            depth, DENSENET_GROWTH_RATES, input_shape, num_classes, seed=seed
        )
    raise ValueError(
        f"Invalid model name: {name!r}. Expected one of: "
        f"{', '.join(MODEL_NAMES)}."
    )
