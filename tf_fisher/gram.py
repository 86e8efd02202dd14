"""Gram matrix of per-example gradients of a Keras model, built layer by layer.

For a batch of B examples, let J be the P x B matrix whose column i is the
gradient of example i's loss with respect to all P trainable parameters (sum
convention: the loss of the batch is the sum of the per-example losses). The
Gram matrix F = Jᵀ J is B x B and has the same nonzero eigenvalues as the
empirical Fisher J Jᵀ (Liao, Drummond, Reid and Carneiro, "Approximate Fisher
Information Matrix to Characterise the Training of Deep Neural Networks",
IEEE TPAMI 2020).

F is a sum over layers, F = Σ_l J_lᵀ J_l, so it is accumulated one layer at a
time and J is never held whole. One forward pass records every layer's input
and output, and one backward pass returns the gradient arriving at every
layer's output. From those two tensors each layer's block follows.
`GramTaps`, which `gram_matrix` and `tf_fisher.FisherModel` use, forms each
block inside the backward pass as soon as its gradient arrives. So the probe
adds to the memory of a training step only the B x B blocks and the
temporaries of a few layers at a time (along a chain of layers, three by
default; see `GramTaps`), which for a materialised convolution are their
per-example gradients. The blocks are:

* `Dense` and `Conv2D` (no groups): the weight gradient of example i is
  Σ_t a_it ⊗ g_it over output positions t, with a the layer input (for a
  convolution, the input patch) and g the gradient of the pre-activation
  output. The block is either the pairwise form
  Σ_{t,s} (a_it · a_js)(g_it · g_js), which for a single position is
  (A Aᵀ) ⊙ (G Gᵀ), or the Gram of the materialised per-example gradients,
  whichever costs fewer multiply-adds (`linear_gram_form`). A convolution
  materialises them with TensorFlow's filter-gradient op, grouped so that
  each example is one group. The bias adds the Gram of Σ_t g_it.
* `BatchNormalization` in training mode couples the examples of a batch. As in
  the authors' code, example i contributes γ_i = Σ_space x̂_i · δ_i and
  β_i = Σ_space δ_i, with x̂ normalised by the batch statistics and δ the
  gradient of the batch loss at the layer output. These contributions sum to
  the batch gradient; for layers without cross-example coupling they equal the
  per-example gradients. In a training step, `GramTaps` runs the layer with
  a backward pass of its own, which forms these sums once and takes the
  layer's gradients from them.
* Any other layer with trainable weights, including a subclass of `Dense`,
  `Conv2D` or `BatchNormalization` that overrides its forward pass: the
  gradients of its weights for each example, from a `tf.GradientTape` around
  that layer alone, called with every argument of the recorded call and
  mapped over the batch with `tf.vectorized_map`. One warning names the
  layer class. A layer that draws random numbers in training (dropout
  inside an `LSTM`) is rejected, because the tape would draw new ones.

`gram_matrix` is the public entry point. `gram_matrix(..., method="tape")` (the
per-layer tape for every layer), `whole_model_gram_matrix` (a whole-model
`tf.vectorized_map`) and `loop_gram_matrix` (one backward pass per
example) compute the same matrix by slower routes, for benchmarks and
cross-checks. They share code with the fast route, so the tests check every
route against per-example loops and numpy contributions written in the
tests themselves.
"""

import collections
import dataclasses
import math
import warnings

import keras
import tensorflow as tf
from keras.src.trainers import compile_utils

# Layer classes whose Gram block has a closed form here.
_CLOSED_FORM_LAYERS = (
    keras.layers.Dense,
    keras.layers.Conv2D,
    keras.layers.BatchNormalization,
)
_warned_layer_classes = set()


@dataclasses.dataclass
class LayerCall:
    """One call of a layer with trainable weights, recorded in a forward pass.

    Attributes:
        layer: the Keras layer.
        inputs: the first positional argument of the call (a tensor or a
            nested structure of tensors), batch first.
        output: the output tensor, `[batch, ...]`, or a nested structure of
            them for a layer with several outputs.
        args: all positional arguments of the call; empty means
            `(inputs,)`.
        kwargs: the keyword arguments of the call other than `training`,
            such as the second input of `MultiHeadAttention` or a mask.
    """

    layer: keras.layers.Layer
    inputs: object
    output: object
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)

    def arguments(self):
        """Return `(args, kwargs)` as the layer was called."""
        return self.args or (self.inputs,), self.kwargs


def _functional_of(model):
    """Return the `Functional` graph behind `model`, or None if it has none."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and hasattr(
        model, "_run_through_graph"
    ):
        return model
    return None


def can_trace(model):
    """Return True when `model` is a graph of layers that can be traced.

    Functional and built Sequential models can; subclassed models cannot,
    because their `call` is arbitrary Python.
    """
    return _functional_of(model) is not None


def _call_with_training(layer, args, kwargs, training):
    kwargs = dict(kwargs)
    if getattr(layer, "_call_has_training_arg", False):
        kwargs["training"] = training
    return layer(*args, **kwargs)


def traced_call(model, inputs, training=True, taps=None):
    """Run `model` on `inputs` and record every call of a layer with weights.

    Nested `Functional` and `Sequential` models are traced through, so the
    records hold leaf layers only.

    Args:
        model: a Functional or built Sequential `keras.Model`.
        inputs: the model input, as `model(inputs)` takes it.
        training: the training flag passed to every layer that accepts one.
        taps: optional `GramTaps`; each recorded output then flows on to
            the next layers through `taps.tap`.

    Returns:
        A pair `(outputs, calls)`: the model outputs and a list of `LayerCall`
        in call order.

    Raises:
        ValueError: if the model is not a graph of layers.
    """
    calls = []
    outputs = _trace_graph(model, inputs, training, calls, taps)
    return outputs, calls


def _trace_graph(model, inputs, training, calls, taps):
    graph = _functional_of(model)
    if graph is None:
        raise ValueError(
            f"Cannot trace the layers of model {model.name!r} "
            f"({type(model).__name__}): only Functional models and Sequential "
            "models with a known input shape can be traced. Build the model "
            "with `keras.Input`, or use `whole_model_gram_matrix`."
        )

    # Keras' Functional.call orders a dict or nested inputs into the flat
    # list of graph inputs with `_standardize_inputs` before it runs the
    # graph, so this does the same (private, as of Keras 3.15).
    inputs = graph._standardize_inputs(inputs)

    def operation_fn(operation):
        def call(*args, **kwargs):
            if _functional_of(operation) is not None and isinstance(
                operation, keras.Model
            ):
                return _trace_graph(
                    operation, args[0], training, calls, taps
                )
            fused = taps is not None and taps.fuses(
                operation, args, kwargs, training
            )
            if fused:
                output = taps.batch_norm(operation, args[0])
            else:
                output = _call_with_training(
                    operation, args, kwargs, training
                )
            # Operations other than layers (`inputs * 2.0`, `keras.ops.*`,
            # masks) have no weights.
            if getattr(operation, "trainable_weights", None):
                calls.append(
                    LayerCall(operation, args[0], output, args, dict(kwargs))
                )
                if taps is not None and not fused:
                    output = taps.tap(calls[-1])
            return output

        return call

    return graph._run_through_graph(inputs, operation_fn=operation_fn)


def loss_values(loss, y_true, y_pred):
    """Return the unreduced loss values `[batch, ...]` of a Keras loss.

    A loss name or function is turned into a `keras.losses.Loss` as
    `compile` does it, so the values are those Keras trains on: targets one
    rank below the outputs, such as labels `[batch]` for outputs
    `[batch, 1]`, gain the missing axis (or the outputs lose it), and
    "crossentropy" picks the binary, categorical or sparse form from the
    shapes. Where `y_pred` carries a Keras mask (from
    `Embedding(mask_zero=True)` or `Masking`), masked values are zero, as in
    the loss Keras trains on.

    Args:
        loss: a `keras.losses.Loss` (its reduction is ignored), the name of
            a Keras loss, or a callable `(y_true, y_pred) -> [batch, ...]`
            of unreduced losses.
        y_true: targets, batch first.
        y_pred: model outputs, batch first.
    """
    values = tf.convert_to_tensor(
        _as_keras_loss(loss, y_true, y_pred).call(y_true, y_pred)
    )
    mask = _loss_mask(y_pred, values)
    return values if mask is None else values * mask


def _as_keras_loss(loss, y_true, y_pred):
    """Return `loss` as the `keras.losses.Loss` that `compile` makes of it.

    NOTE: `compile_utils.get_loss` is the private Keras 3.15 helper behind
    `compile`. It resolves a name, "crossentropy" from the shapes, and
    wraps a function in `keras.losses.LossFunctionWrapper`, whose `call`
    squeezes or expands `y_true` to the rank of `y_pred` first. Calling the
    bare function instead would broadcast labels `[batch]` against outputs
    `[batch, 1]` into `[batch, batch]` values.
    """
    return compile_utils.get_loss(loss, y_true, y_pred)


def loss_value_count(loss, y_true, y_pred):
    """Return the number of loss values that a "sum_over_batch_size" loss
    averages: all values, or the unmasked ones when `y_pred` has a mask.

    Keras divides the sum of the loss values by this number, so the
    gradient of the mean loss times this number is the gradient of the
    summed loss. A loss that returns one value for the whole batch counts
    as a mean over the batch.
    """
    values = loss_values(loss, y_true, y_pred)
    if values.shape.rank == 0:
        return tf.shape(y_pred)[0]
    mask = _loss_mask(y_pred, values)
    if mask is None:
        return tf.size(values)
    return tf.reduce_sum(mask * tf.ones_like(values))


def _loss_mask(y_pred, values):
    """Return the Keras mask of `y_pred` as a float tensor broadcastable to
    `values`, or None when it has none.

    NOTE: Keras 3.15 keeps the mask of a TensorFlow tensor in its
    `_keras_mask` attribute (`keras.src.backend.get_keras_mask`).
    """
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is None or values.shape.rank == 0:
        return None
    mask = tf.cast(mask, values.dtype)
    while mask.shape.rank > values.shape.rank and mask.shape[-1] == 1:
        mask = tf.squeeze(mask, axis=-1)
    while mask.shape.rank < values.shape.rank:
        mask = mask[..., tf.newaxis]
    return mask


def per_example_losses(loss, y_true, y_pred):
    """Return the loss of each example, `[batch]`, from a Keras loss.

    Args:
        loss: a `keras.losses.Loss` (its reduction is ignored) or a callable
            `(y_true, y_pred) -> [batch, ...]` of unreduced losses.
        y_true: targets, batch first.
        y_pred: model outputs, batch first.

    Returns:
        `[batch]` float tensor; any axes after the first are summed.
    """
    values = loss_values(loss, y_true, y_pred)
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_sum(values, axis=list(range(1, values.shape.rank)))
    return values


# Derivatives of common activations written in terms of their output y, so
# the gradient before the activation needs no second pass through the layer.
# Each matches the gradient TensorFlow registers for the op.
_ACTIVATION_DERIVATIVES = {
    keras.activations.relu: lambda y: tf.cast(y > 0, y.dtype),
    keras.activations.sigmoid: lambda y: y * (1 - y),
    keras.activations.tanh: lambda y: 1 - tf.square(y),
}


def _pre_activation_gradient(layer, inputs, output, output_gradient):
    """Return the gradient at the output of `layer` before its activation.

    ReLU, sigmoid and tanh use their derivative at the recorded `output`;
    any other activation is applied again to the recomputed linear output.
    """
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return output_gradient
    derivative = _ACTIVATION_DERIVATIVES.get(activation)
    if derivative is not None:
        return output_gradient * derivative(output)
    pre_activation = _linear_output(layer, inputs)
    with tf.GradientTape() as tape:
        tape.watch(pre_activation)
        recomputed = activation(pre_activation)
    return tape.gradient(
        recomputed, pre_activation, output_gradients=output_gradient
    )


def _linear_output(layer, inputs):
    if isinstance(layer, keras.layers.Dense):
        outputs = tf.matmul(inputs, layer.kernel)
    else:
        outputs = layer.convolution_op(inputs, layer.kernel)
    if layer.bias is not None:
        outputs = outputs + layer.bias
    return outputs


def _static_batch(tensor, default=128):
    batch = tensor.shape[0]
    return default if batch is None else batch


def linear_gram_form(batch, positions, d_in, d_out):
    """Choose how to form the Gram block of a weight shared across positions.

    Args:
        batch: B, the number of examples.
        positions: T, output positions per example (1 for a Dense layer on
            a vector).
        d_in: inputs per position (for a convolution, kernel height x
            kernel width x input channels).
        d_out: outputs per position.

    Returns:
        "pairwise" when Σ_{t,s} (a_it · a_js)(g_it · g_js) needs no more
        multiply-adds, B² T² (d_in + d_out + 1), than materialising the
        per-example gradients and taking their inner products,
        B T d_in d_out + B² d_in d_out; otherwise "materialised".
    """
    pairwise_cost = batch * batch * positions * positions * (d_in + d_out + 1)
    materialised_cost = (
        batch * positions * d_in * d_out + batch * batch * d_in * d_out
    )
    return "pairwise" if pairwise_cost <= materialised_cost else "materialised"


# `_row_products` forms M Mᵀ from upper blocks when M has at least this
# many rows (examples) and columns.
_BLOCKED_PRODUCT_ROWS = 256
_BLOCKED_PRODUCT_COLUMNS = 8192
# Row blocks of M in `_blocked_row_products`.
_ROW_BLOCKS = 4


def _batched_product(left, right):
    """left rightᵀ, written as a batch of one matrix product.

    With oneDNN, TensorFlow 2.21's BatchMatMul ran M Mᵀ two to three times
    faster on 2 CPU cores than `tf.matmul(M, M, transpose_b=True)` for 128
    rows and 1,000 to 37,000 columns.
    """
    return tf.matmul(left[tf.newaxis], right[tf.newaxis], transpose_b=True)[0]


def _blocked_row_products(matrix):
    """M Mᵀ from the products of row blocks on and above the diagonal.

    With 4 row blocks, 10 of the 16 block products are formed and the
    other 6 are their transposes. On 2 CPU cores (AMD EPYC, TensorFlow 2.21
    with oneDNN) this ran 1.25 to 1.5 times faster than one product for 256
    and 512 rows and 9,000 to 37,000 columns. With 128 rows, or with 512
    rows of 1,000 to 2,300 columns, it ran up to 10% slower, and slower
    still inside the MLP's training step. In ResNet-20's probed step at
    batch 512 it cut the ratio to a plain step from 1.93 to 1.84.
    """
    rows = tf.shape(matrix)[0]
    size = -(-rows // _ROW_BLOCKS)
    blocks = [
        matrix[index * size : (index + 1) * size]
        for index in range(_ROW_BLOCKS)
    ]
    products = {}
    for i in range(_ROW_BLOCKS):
        for j in range(i, _ROW_BLOCKS):
            products[i, j] = _batched_product(blocks[i], blocks[j])
    return tf.concat([
        tf.concat([
            products[i, j] if j >= i else tf.transpose(products[j, i])
            for j in range(_ROW_BLOCKS)
        ], axis=1)
        for i in range(_ROW_BLOCKS)
    ], axis=0)


def _row_products(matrix, dtype=tf.float32):
    """M Mᵀ, `[rows, rows]`, of a `[rows, columns]` matrix, formed in
    `dtype`."""
    matrix = tf.cast(matrix, dtype)
    rows, columns = matrix.shape
    if columns is None or columns < _BLOCKED_PRODUCT_COLUMNS:
        return _batched_product(matrix, matrix)
    if rows is not None and rows >= _BLOCKED_PRODUCT_ROWS:
        return _blocked_row_products(matrix)
    if rows is not None:
        return _batched_product(matrix, matrix)
    return tf.cond(
        tf.shape(matrix)[0] >= _BLOCKED_PRODUCT_ROWS,
        lambda: _blocked_row_products(matrix),
        lambda: _batched_product(matrix, matrix),
    )


def _pairwise_gram(inputs, gradients, dtype=tf.float32):
    """Σ_{t,s} (a_it · a_js)(g_it · g_js), `[batch, batch]`, in `dtype`."""
    if inputs.shape[1] == 1:
        return _row_products(inputs[:, 0, :], dtype) * _row_products(
            gradients[:, 0, :], dtype
        )
    inputs = tf.cast(inputs, dtype)
    gradients = tf.cast(gradients, dtype)
    a_products = tf.einsum("itd,jsd->ijts", inputs, inputs)
    g_products = tf.einsum("itd,jsd->ijts", gradients, gradients)
    return tf.reduce_sum(a_products * g_products, axis=[2, 3])


def _flat_gram(per_example, dtype=tf.float32):
    """Gram matrix `[batch, batch]` of per-example tensors `[batch, ...]`.

    The row length stays static when the per-example shape is known, even
    if the batch size is not, so that `_row_products` can choose its form
    inside a step compiled for any batch size.
    """
    trailing = per_example.shape[1:]
    columns = -1 if None in trailing else math.prod(trailing)
    return _row_products(
        tf.reshape(per_example, [tf.shape(per_example)[0], columns]), dtype
    )


def linear_gram(inputs, gradients):
    """Gram block of a weight shared across positions, without bias.

    The weight gradient of example i is Σ_t a_it ⊗ g_it. The block is formed
    in whichever of two ways `linear_gram_form` finds cheaper for these
    shapes: the pairwise form Σ_{t,s} (a_it · a_js)(g_it · g_js), or
    materialising each example's `[d_in, d_out]` gradient and taking inner
    products.

    Args:
        inputs: `[batch, positions, d_in]` layer inputs (or input patches).
        gradients: `[batch, positions, d_out]` pre-activation gradients.

    Returns:
        `[batch, batch]` float32 Gram block.
    """
    return _linear_block(inputs, gradients)[0]


def _linear_block(inputs, gradients, dtype=tf.float32):
    """Return `linear_gram`, formed in `dtype`, and the summed weight
    gradient `[d_in, d_out]`, or None in its place when the pairwise form
    avoided forming it."""
    form = linear_gram_form(
        _static_batch(inputs), inputs.shape[1], inputs.shape[2],
        gradients.shape[2],
    )
    if form == "pairwise":
        return _pairwise_gram(inputs, gradients, dtype), None
    per_example = tf.einsum("itd,ite->ide", inputs, gradients)
    return (
        _flat_gram(per_example, dtype), tf.reduce_sum(per_example, axis=0)
    )


def _as_positions(tensor):
    """Reshape `[batch, ..., d]` to `[batch, positions, d]`."""
    depth = tensor.shape[-1]
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1, depth])


def _with_static_positions(flat, original):
    positions = 1
    for size in original.shape[1:-1]:
        positions = None if size is None or positions is None else (
            positions * size
        )
    if positions is not None:
        flat = tf.ensure_shape(flat, [None, positions, original.shape[-1]])
    return flat


def _has_trainable_bias(layer):
    return layer.bias is not None and layer.bias.trainable


def _dense_gram(
    layer, inputs, output, output_gradient, kernel_gradients, dtype
):
    gradient = tf.cast(
        _pre_activation_gradient(layer, inputs, output, output_gradient),
        tf.float32,
    )
    inputs = tf.cast(inputs, tf.float32)
    a = _with_static_positions(_as_positions(inputs), inputs)
    g = _with_static_positions(_as_positions(gradient), gradient)
    has_kernel = layer.kernel.trainable
    has_bias = _has_trainable_bias(layer)
    if a.shape[1] == 1 and has_kernel:
        # Kernel and bias together: ((A Aᵀ) + 1) ⊙ (G Gᵀ).
        input_products = _row_products(a[:, 0, :], dtype)
        if has_bias:
            input_products += 1.0
        return input_products * _row_products(g[:, 0, :], dtype)
    gram = tf.zeros([tf.shape(a)[0]] * 2, dtype)
    if has_kernel:
        block, kernel_gradient = _linear_block(a, g, dtype)
        gram += block
        if kernel_gradient is not None:
            kernel_gradients[id(layer.kernel)] = kernel_gradient
    if has_bias:
        gram += _flat_gram(tf.reduce_sum(g, axis=1), dtype)
    return gram


def _axis_windows(size, kernel, stride, rate, padding):
    """Place a convolution's windows along one spatial axis.

    Returns:
        (outputs, before, length): the number of output positions, the
        zeros that TensorFlow pads before the input, and a padded length.
        The length is a multiple of `stride` and covers every input
        position that a window reads, `offset + stride * t` for kernel tap
        `offset` and output `t`.
    """
    span = (kernel - 1) * rate + 1
    if padding == "same":
        outputs = -(-size // stride)
        before = max((outputs - 1) * stride + span - size, 0) // 2
    else:
        outputs = (size - span) // stride + 1
        before = 0
    length = stride * ((kernel - 1) * rate // stride + outputs)
    return outputs, before, length


def _conv_patches(layer, inputs):
    """Input patches `[batch, out_height, out_width, kh * kw * channels]`
    of `inputs`, whose height, width and channels must be known when the
    function is traced.

    The entries of a patch are in the order of the kernel's rows, columns
    and input channels, as `tf.image.extract_patches` gives them. Each
    kernel tap reads a shifted view of the padded input. The input is
    reshaped so that the strides become an axis of their own, and every
    view is then a contiguous slice, concatenated on the channel axis.
    This was measured at batch 128 on 2 CPU cores (Intel Xeon, TensorFlow
    2.21 with oneDNN), for 3 x 3 kernels on 8 x 8 to 32 x 32 maps. The
    patches and their products with the output gradients ran 1.4 to 3.1
    times faster than with `tf.image.extract_patches`. Strided slices, where
    the stride was 2, ran 3.7 times slower than `tf.image.extract_patches`.
    """
    height, width, channels = inputs.shape[1:]
    out_height, top, padded_height = _axis_windows(
        height, layer.kernel_size[0], layer.strides[0],
        layer.dilation_rate[0], layer.padding,
    )
    out_width, left, padded_width = _axis_windows(
        width, layer.kernel_size[1], layer.strides[1],
        layer.dilation_rate[1], layer.padding,
    )
    padded = tf.pad(inputs, [
        [0, 0],
        [top, max(padded_height - top - height, 0)],
        [left, max(padded_width - left - width, 0)],
        [0, 0],
    ])[:, :padded_height, :padded_width]
    stride_height, stride_width = layer.strides
    split = tf.reshape(padded, [
        -1, padded_height // stride_height, stride_height,
        padded_width // stride_width, stride_width, channels,
    ])
    views = []
    for row in range(layer.kernel_size[0]):
        for column in range(layer.kernel_size[1]):
            offset_row = row * layer.dilation_rate[0]
            offset_column = column * layer.dilation_rate[1]
            first_row = offset_row // stride_height
            first_column = offset_column // stride_width
            views.append(split[
                :,
                first_row : first_row + out_height,
                offset_row % stride_height,
                first_column : first_column + out_width,
                offset_column % stride_width,
            ])
    return tf.concat(views, axis=-1)


# Examples per grouped filter-gradient op in `_conv_kernel_gradients`.
# Measured on 2 CPU cores (AMD EPYC, TensorFlow 2.21 with oneDNN), batches of
# 128 or 512 examples. For 32 x 32 and 16 x 16 feature maps of 16 and 32
# channels, chunks of 16 ran 1.2 to 1.9 times faster than one op over the
# batch. For 8 x 8 x 64 they ran up to 10% slower.
_CONV_EXAMPLES_PER_OP = 16


# `_conv_gram` forms per-example kernel gradients as products of input
# patches and output gradients, instead of grouped filter-gradient ops, when
# in_channels x filters >= _PATCH_PRODUCT_RATIO x output positions: small
# feature maps with many channels. Measured on 2 CPU cores (AMD EPYC) with
# `tf.image.extract_patches`, at batches of 32, 128 and 512: for
# 8 x 8 x 64 -> 64 and for a stride-2 16 x 16 x 32 -> 64 the products ran
# 1.1 to 1.5 times faster than the grouped ops, and for 16 x 16 x 32 -> 32
# and 32 x 32 maps up to 2.5 times slower. In ResNet-8's probed step at
# batch 128 they cut the CPU time from 1.56 to 1.52 times a plain step's.
# With the patches from shifted views (`_conv_patches`), on the Intel Xeon
# at batch 128, the products ran 1.1 to 1.6 times faster than the grouped
# ops for the first two shapes. For the others they ran 1.4 to 3.3 times
# slower, so the threshold is unchanged.
_PATCH_PRODUCT_RATIO = 32


def _conv_kernel_gradients(layer, inputs, gradient):
    """Per-example kernel gradients `[rows, kh, kw, in_channels, filters]`.

    Args:
        layer: a `Conv2D` layer with `channels_last` data.
        inputs: `[batch, height, width, in_channels]` float32 layer inputs.
        gradient: `[batch, out_height, out_width, filters]` float32
            gradients before the activation.

    Returns:
        Row i < batch is the kernel gradient of example i. When the batch is
        split into chunks, zero rows pad it to whole chunks, so `rows` may
        exceed `batch`.
    """
    static_batch = inputs.shape[0]
    if static_batch is not None and static_batch <= _CONV_EXAMPLES_PER_OP:
        grouped = _grouped_filter_gradient(
            layer, _batch_into_channels(inputs)[0],
            _batch_into_channels(gradient)[0], static_batch,
        )
        return _examples_first(grouped[tf.newaxis], layer, static_batch)

    chunk = _CONV_EXAMPLES_PER_OP
    chunks = -(-tf.shape(inputs)[0] // chunk)
    input_chunks = _batch_into_channels(inputs, chunk)
    gradient_chunks = _batch_into_channels(gradient, chunk)

    def body(index, results):
        grouped = _grouped_filter_gradient(
            layer, input_chunks[index], gradient_chunks[index], chunk
        )
        return index + 1, results.write(index, grouped)

    _, results = tf.while_loop(
        lambda index, _: index < chunks,
        body,
        (tf.constant(0), tf.TensorArray(tf.float32, size=chunks)),
        parallel_iterations=2,
    )
    return _examples_first(results.stack(), layer, chunk)


def _batch_into_channels(tensor, chunk=None):
    """Move the examples into the channel axis, one chunk at a time.

    Args:
        tensor: `[batch, height, width, channels]`.
        chunk: examples per chunk; None puts the whole batch in one chunk.

    Returns:
        `[chunks, 1, height, width, chunk * channels]`; the batch is padded
        with zero examples to whole chunks.
    """
    shape = tf.shape(tensor)
    channels = tensor.shape[-1]
    if chunk is None:
        chunk, chunks = shape[0], 1
    else:
        chunks = -(-shape[0] // chunk)
        padding = chunks * chunk - shape[0]
        tensor = tf.pad(tensor, [[0, padding], [0, 0], [0, 0], [0, 0]])
    split = tf.reshape(tensor, [chunks, chunk, shape[1], shape[2], channels])
    moved = tf.transpose(split, [0, 2, 3, 1, 4])
    return tf.reshape(moved, [chunks, 1, shape[1], shape[2], -1])


def _grouped_filter_gradient(layer, inputs, gradient, examples):
    """Kernel gradients of `examples` examples from one grouped op.

    With the examples in the channel axis (`_batch_into_channels`), example
    i is group i of a convolution with one group per example, whose filter
    gradient is the gradient of example i alone.

    Returns:
        `[kh, kw, in_channels, examples * filters]`.
    """
    kernel_height, kernel_width = layer.kernel_size
    return tf.raw_ops.Conv2DBackpropFilter(
        input=inputs,
        filter_sizes=tf.stack([
            kernel_height, kernel_width, layer.kernel.shape[2],
            examples * layer.filters,
        ]),
        out_backprop=gradient,
        strides=[1, *layer.strides, 1],
        padding=layer.padding.upper(),
        dilations=[1, *layer.dilation_rate, 1],
    )


def _examples_first(grouped, layer, chunk):
    """`[chunks, kh, kw, in, chunk * filters]` to `[rows, kh, kw, in,
    filters]`, rows = chunks * chunk."""
    kernel_height, kernel_width, in_channels, _ = layer.kernel.shape
    split = tf.reshape(grouped, [
        -1, kernel_height, kernel_width, in_channels, chunk, layer.filters
    ])
    moved = tf.transpose(split, [0, 4, 1, 2, 3, 5])
    return tf.reshape(
        moved, [-1, kernel_height, kernel_width, in_channels, layer.filters]
    )


def _conv_gram(
    layer, inputs, output, output_gradient, kernel_gradients, dtype
):
    gradient = tf.cast(
        _pre_activation_gradient(layer, inputs, output, output_gradient),
        tf.float32,
    )
    inputs = tf.cast(inputs, tf.float32)
    gram = tf.zeros([tf.shape(inputs)[0]] * 2, dtype)
    if _has_trainable_bias(layer):
        gram += _flat_gram(tf.reduce_sum(gradient, axis=[1, 2]), dtype)
    if not layer.kernel.trainable:
        return gram
    kernel_height, kernel_width = layer.kernel_size
    in_channels = inputs.shape[-1]
    if None in gradient.shape[1:3]:
        # Feature maps of any size: the grouped ops take dynamic shapes.
        form, grouped = "materialised", True
    else:
        positions = gradient.shape[1] * gradient.shape[2]
        d_in = kernel_height * kernel_width * in_channels
        form = linear_gram_form(
            _static_batch(inputs), positions, d_in, gradient.shape[-1]
        )
        grouped = form == "materialised" and (
            in_channels * layer.filters < _PATCH_PRODUCT_RATIO * positions
        )
    if grouped:
        per_example = _conv_kernel_gradients(layer, inputs, gradient)
        kernel_gradients[id(layer.kernel)] = tf.reduce_sum(per_example, axis=0)
        # Padding rows are zero; cut their rows and columns off the block.
        batch = tf.shape(inputs)[0]
        return gram + _flat_gram(per_example, dtype)[:batch, :batch]
    patches = _conv_patches(layer, inputs)
    a = _with_static_positions(_as_positions(patches), patches)
    g = _with_static_positions(_as_positions(gradient), gradient)
    block, kernel_gradient = _linear_block(a, g, dtype)
    if kernel_gradient is not None:
        kernel_gradients[id(layer.kernel)] = tf.reshape(
            kernel_gradient, layer.kernel.shape
        )
    return gram + block


def _normalized_inputs(layer, inputs, mask=None):
    """Return x̂, the input of a BatchNormalization normalised by batch
    moments, which leave out the positions that `mask` hides."""
    inputs = tf.cast(inputs, tf.float32)
    mean, variance = _batch_moments(layer, inputs, mask)
    shape = _channel_shape(layer, inputs.shape.rank)
    mean = tf.reshape(mean, shape)
    variance = tf.reshape(variance, shape)
    return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon)


def _input_mask(inputs, kwargs):
    """Return the Keras mask of a layer call: its `mask` argument, else the
    mask that `inputs` carries, else None."""
    mask = (kwargs or {}).get("mask")
    if mask is None:
        mask = getattr(inputs, "_keras_mask", None)
    return mask


def _batch_moments(layer, inputs, mask=None):
    """Mean and variance `[channels]` of a BatchNormalization input.

    Computed with the same ops as Keras 3.15's BatchNormalization computes
    them for float32 inputs, so Grappler can merge the two. With a mask,
    only the positions it keeps count, as in the layer.
    """
    inputs = tf.cast(inputs, tf.float32)
    if mask is None:
        return tf.nn.moments(inputs, axes=layer._reduction_axes)
    # NOTE: `_moments` is the private Keras 3.15 method through which the
    # layer takes its masked moments.
    return layer._moments(inputs, mask)


def _batch_norm_contributions(
    layer, inputs, output_gradient, moments=None, mask=None
):
    """Per-example contributions `[batch, channels]` of γ and of β.

    `moments` are the batch moments from `_batch_moments`, computed here
    with `mask` when None.
    """
    inputs = tf.cast(inputs, tf.float32)
    delta = tf.cast(output_gradient, tf.float32)
    if layer.scale and layer.gamma.trainable:
        mean, variance = moments or _batch_moments(layer, inputs, mask)
        gamma_sums, beta_sums = _batch_norm_sums(
            layer, inputs, delta, mean, variance
        )
    else:
        gamma_sums = None
        beta_sums = tf.reduce_sum(delta, axis=_space_axes(layer))
    return _trainable_contributions(layer, gamma_sums, beta_sums)


def _space_axes(layer):
    """Return the axes, other than the batch axis, over which a
    BatchNormalization layer takes its statistics."""
    return [axis for axis in layer._reduction_axes if axis != 0]


def _channel_shape(layer, rank):
    """Return the shape that broadcasts a `[channels]` vector along
    `layer.axis`."""
    shape = [1] * rank
    shape[layer.axis] = -1
    return shape


def _batch_norm_sums(layer, inputs, delta, mean, variance):
    """Return γ_i = Σ_space x̂_i δ_i and β_i = Σ_space δ_i, each `[batch,
    channels]`.

    γ_i is formed as Σ_space (x_i - μ) δ_i / sqrt(σ² + ε), so the only
    full-size products are x - μ and (x - μ) δ.
    """
    space_axes = _space_axes(layer)
    centered = inputs - tf.reshape(
        mean, _channel_shape(layer, inputs.shape.rank)
    )
    gamma_sums = tf.reduce_sum(centered * delta, axis=space_axes)
    gamma_sums *= tf.math.rsqrt(variance + layer.epsilon)
    return gamma_sums, tf.reduce_sum(delta, axis=space_axes)


def _trainable_contributions(layer, gamma_sums, beta_sums):
    """Return the contributions of the trainable weights among γ and β, in
    the order of `layer.trainable_weights`."""
    contributions = []
    if layer.scale and layer.gamma.trainable:
        contributions.append(gamma_sums)
    if layer.center and layer.beta.trainable:
        contributions.append(beta_sums)
    return contributions


def _batch_norm_gram(
    layer, inputs, output_gradient, moments=None, mask=None,
    dtype=tf.float32,
):
    _check_batch_norm(layer)
    contributions = _batch_norm_contributions(
        layer, inputs, output_gradient, moments, mask
    )
    if not contributions:
        return tf.zeros([tf.shape(inputs)[0]] * 2, dtype)
    return _flat_gram(tf.concat(contributions, axis=1), dtype)


def _check_batch_norm(layer):
    if not _keeps_forward_pass(layer):
        raise NotImplementedError(
            f"Layer {layer.name!r}: {type(layer).__name__} subclasses "
            "BatchNormalization and overrides its call, so tf_fisher cannot "
            "form the per-example contributions of its weights. Use "
            "keras.layers.BatchNormalization itself."
        )
    if layer.renorm or layer.synchronized:
        raise NotImplementedError(
            f"Layer {layer.name!r}: BatchNormalization with renorm=True or "
            "synchronized=True has no per-example form here. Use plain "
            "BatchNormalization."
        )
    if 0 not in layer._reduction_axes or layer.axis == 0:
        raise NotImplementedError(
            f"Layer {layer.name!r}: BatchNormalization must normalise over "
            f"the batch axis; received axis={layer.axis}."
        )


# Methods that define the forward pass of each closed-form class. A subclass
# that overrides one of them computes something else, so its block comes from
# the per-example tape.
_FORWARD_METHODS = {
    keras.layers.Dense: ("call", "kernel"),
    keras.layers.Conv2D: ("call", "convolution_op", "kernel"),
    keras.layers.BatchNormalization: ("call",),
}


def _keeps_forward_pass(layer):
    """Return True unless the class of `layer` overrides the forward pass of
    the Keras class whose closed form `_closed_form_gram` uses."""
    for base, names in _FORWARD_METHODS.items():
        if isinstance(layer, base):
            return all(
                getattr(type(layer), name) is getattr(base, name)
                for name in names
            )
    return False


def _closed_form_obstacle(layer):
    """Return None when `layer` has a closed-form Gram block, or else why
    it takes the per-example tape: "" for a class without a closed form,
    or the setting that rules it out, such as " with groups=2"."""
    if not isinstance(layer, _CLOSED_FORM_LAYERS):
        return ""
    if not _keeps_forward_pass(layer):
        return " with a forward pass of its own"
    if isinstance(layer, keras.layers.BatchNormalization):
        return None
    if getattr(layer, "lora_enabled", False):
        return " with LoRA enabled"
    if getattr(layer, "quantization_mode", None) is not None:
        return f" quantized to {layer.quantization_mode}"
    if not isinstance(layer, keras.layers.Conv2D):
        return None
    settings = []
    if layer.groups != 1:
        settings.append(f"groups={layer.groups}")
    if layer.data_format != "channels_last":
        settings.append(f"data_format={layer.data_format!r}")
    if layer.padding not in ("same", "valid"):
        settings.append(f"padding={layer.padding!r}")
    return f" with {', '.join(settings)}" if settings else None


def _is_closed_form(layer):
    return _closed_form_obstacle(layer) is None


def _closed_form_gram(
    call, output_gradient, kernel_gradients, moments, dtype
):
    layer, inputs = call.layer, call.inputs
    if isinstance(layer, keras.layers.BatchNormalization):
        return _batch_norm_gram(
            layer, inputs, output_gradient, moments,
            _input_mask(inputs, call.kwargs), dtype,
        )
    if isinstance(layer, keras.layers.Conv2D):
        return _conv_gram(
            layer, inputs, call.output, output_gradient, kernel_gradients,
            dtype,
        )
    return _dense_gram(
        layer, inputs, call.output, output_gradient, kernel_gradients, dtype
    )


def _per_example_layer_gradients(
    layer, inputs, output_gradient, args=None, kwargs=None
):
    """Flattened per-example weight gradients `[batch, weights]` of one layer.

    A `tf.GradientTape` around the layer alone, applied to one example and
    mapped over the batch. Every tensor argument of the call (for example
    the value of a `MultiHeadAttention` or the mask of an `LSTM`) is split
    into examples with the first one. BatchNormalization is taken as the
    affine map γ x̂_i + β with x̂ fixed by the batch statistics, so its
    per-example gradients are the per-example contributions.

    Args:
        layer: the Keras layer.
        inputs: the first positional argument of the call, batch first.
        output_gradient: gradient of the summed batch loss at the layer
            output, with the structure of the output.
        args: all positional arguments of the call; None means
            `(inputs,)`.
        kwargs: the keyword arguments of the call other than `training`.
    """
    weights = layer.trainable_weights
    if isinstance(layer, keras.layers.BatchNormalization):
        _check_batch_norm(layer)
        mask = _input_mask(inputs, kwargs)
        args, kwargs = (_normalized_inputs(layer, inputs, mask),), {}
        apply = _apply_batch_norm
    else:
        apply = _apply_layer
    if args is None:
        args = (inputs,)
    leaves = tf.nest.flatten((tuple(args), dict(kwargs or {})))
    tensor_indices = [i for i, leaf in enumerate(leaves) if tf.is_tensor(leaf)]
    flat_gradients = tf.nest.flatten(output_gradient)

    def one_example(example):
        example_tensors, example_gradients = example
        example_leaves = list(leaves)
        for index, tensor in zip(tensor_indices, example_tensors):
            example_leaves[index] = tensor[None]
        example_args, example_kwargs = tf.nest.pack_sequence_as(
            (tuple(args), dict(kwargs or {})), example_leaves
        )
        graph = tf.compat.v1.get_default_graph()
        first_op = len(graph.get_operations())
        with tf.GradientTape() as tape:
            output = apply(layer, example_args, example_kwargs)
        _check_no_random_ops(layer, graph.get_operations()[first_op:])
        gradients = tape.gradient(
            tf.nest.flatten(output),
            weights,
            output_gradients=[g[None] for g in example_gradients],
        )
        return flat_gradient(gradients, weights)

    return tf.vectorized_map(
        one_example,
        ([leaves[i] for i in tensor_indices], flat_gradients),
    )


def _apply_layer(layer, args, kwargs):
    return _call_with_training(layer, args, kwargs, True)


def _apply_batch_norm(layer, args, kwargs):
    """γ x̂ + β for normalised inputs `args[0]`; `kwargs` are not used."""
    del kwargs
    inputs = args[0]
    shape = [1] * inputs.shape.rank
    shape[layer.axis] = inputs.shape[layer.axis]
    output = inputs
    if layer.scale:
        output = output * tf.reshape(layer.gamma, shape)
    if layer.center:
        output = output + tf.reshape(layer.beta, shape)
    return output


def _tape_gram(call, output_gradient, dtype=tf.float32):
    args, kwargs = call.arguments()
    per_example = _per_example_layer_gradients(
        call.layer, call.inputs, output_gradient, args, kwargs
    )
    return _flat_gram(per_example, dtype)


# Attributes through which Keras layers set how they draw random numbers in
# training: Dropout and its variants, RNN and attention dropout, noise.
_RANDOM_ATTRIBUTES = ("rate", "dropout", "recurrent_dropout", "stddev")


def _random_setting(layer):
    """Return `(sublayer, attribute, value)` for the first layer in `layer`
    (itself included) that draws random numbers in training, or None.

    A layer counts when it has a `keras.random.SeedGenerator` attribute, as
    Keras' random layers and RNN cells do, and one of `_RANDOM_ATTRIBUTES`
    is positive. A custom layer may use `rate` for something else.
    """
    # NOTE: `_flatten_layers` is the private Keras 3.15 walk over a layer
    # and the layers it tracks, such as the cell of an LSTM.
    for sublayer in layer._flatten_layers(include_self=True):
        if not any(
            isinstance(value, keras.random.SeedGenerator)
            for value in vars(sublayer).values()
        ):
            continue
        for name in _RANDOM_ATTRIBUTES:
            value = getattr(sublayer, name, None)
            is_number = isinstance(value, (int, float)) and not isinstance(
                value, bool
            )
            if is_number and value > 0:
                return sublayer, name, value
    return None


def _check_not_random(layer):
    """Raise if the per-example tape of `layer` would draw new random
    numbers, so that its block would not belong to the training step."""
    setting = _random_setting(layer)
    if setting is None:
        return
    sublayer, name, value = setting
    raise NotImplementedError(
        f"Layer {layer.name!r} ({type(layer).__name__}) draws random "
        f"numbers in training ({sublayer.name}.{name}={value}). tf_fisher "
        "forms its Gram block by running it again on each example, which "
        "would draw new random numbers, so the block would not match the "
        f"training step. Set {name}=0 in the layer; a keras.layers.Dropout "
        "layer before or after it is supported."
    )


# Control-flow ops whose type starts like that of a stateless random op.
_NOT_RANDOM_OPS = frozenset({"StatelessIf", "StatelessWhile", "StatelessCase"})


def _is_random_op(op_type):
    """Return True for the type of a TensorFlow op that draws random numbers,
    stateful or stateless, such as those of `keras.random` and Dropout."""
    if op_type in _NOT_RANDOM_OPS:
        return False
    return (
        "Random" in op_type
        or "TruncatedNormal" in op_type
        or "Multinomial" in op_type
        or op_type.startswith(("Rng", "StatelessShuffle"))
    )


def _check_no_random_ops(layer, operations):
    """Raise if the per-example call of `layer`, which created `operations`,
    draws random numbers that the attributes read by `_check_not_random`
    do not reveal, such as a `keras.random` call in a custom layer.

    NOTE: ops inside control flow (a `tf.cond` branch) live in functions of
    their own and are not inspected.
    """
    random_types = sorted(
        {op.type for op in operations if _is_random_op(op.type)}
    )
    if random_types:
        raise NotImplementedError(
            f"Layer {layer.name!r} ({type(layer).__name__}) draws random "
            f"numbers in training (ops {', '.join(random_types)}). tf_fisher "
            "forms its Gram block by running it again on each example, which "
            "would draw new random numbers, so the block would not match the "
            "training step. Draw them in a layer without weights, such as "
            "keras.layers.Dropout or GaussianNoise, before or after it."
        )


def _warn_fallback(layer):
    """Warn once for each layer class, and for each setting of a class with
    a closed form, that its blocks come from the per-example tape."""
    name = type(layer).__name__
    setting = _closed_form_obstacle(layer) or ""
    if (name, setting) in _warned_layer_classes:
        return
    _warned_layer_classes.add((name, setting))
    warnings.warn(
        f"tf_fisher has no closed-form Gram block for layers of class {name}"
        f"{setting} (first seen: {layer.name!r}); their per-example "
        "gradients come "
        "from a vectorized per-example tape, which is slower. Closed forms "
        "exist for Dense, for Conv2D with groups=1 and channels_last data, "
        "and for BatchNormalization, in classes that keep their forward "
        "pass.",
        stacklevel=3,
    )


def layer_gram(call, output_gradient, method="fast"):
    """Gram block `[batch, batch]` of one recorded layer call.

    Args:
        call: a `LayerCall` from `traced_call`.
        output_gradient: gradient of the summed batch loss at `call.output`.
        method: "fast" uses the closed forms where they exist, "tape"
            the per-example tape for every layer.

    Returns:
        `[batch, batch]` float32 tensor.
    """
    return _layer_gram(call, output_gradient, method, {})


def _layer_gram(
    call, output_gradient, method, kernel_gradients, moments=None,
    dtype=tf.float32,
):
    """Return the layer's block, with its products formed in `dtype`."""
    if method == "fast" and _is_closed_form(call.layer):
        return _closed_form_gram(
            call, output_gradient, kernel_gradients, moments, dtype
        )
    _check_not_random(call.layer)
    if method == "fast":
        _warn_fallback(call.layer)
    return _tape_gram(call, output_gradient, dtype)


def _enclosing_model(model, layer):
    """Return " (in model 'name')" for the outermost model inside `model`
    that contains `layer`, such as the shared encoder of a siamese network,
    or "" when the layer belongs to `model` itself."""
    # NOTE: `_flatten_layers` is the private Keras 3.15 walk over the layers
    # a layer tracks, nested ones included, outermost first.
    for sublayer in model._flatten_layers(include_self=False):
        if isinstance(sublayer, keras.Model) and any(
            inner is layer for inner in sublayer._flatten_layers()
        ):
            return f" (in model {sublayer.name!r})"
    return ""


def check_traced_weights(model, calls):
    """Raise if the recorded calls do not cover each trainable weight once.

    A layer called twice (shared weights) would need cross terms between its
    calls, and a weight used outside any layer call would be missed.
    """
    seen = {}
    for call in calls:
        seen[id(call.layer)] = seen.get(id(call.layer), 0) + 1
        if seen[id(call.layer)] > 1:
            raise NotImplementedError(
                f"Layer {call.layer.name!r}{_enclosing_model(model, call.layer)}"
                " is called more than once in one "
                "forward pass; per-example Gram blocks of shared layers are "
                "not supported, so FisherModel cannot probe this model. "
                "Give each call its own layer, or measure single batches "
                "with `tf_fisher.gram.loop_gram_matrix`."
            )
    covered = {id(w) for call in calls for w in call.layer.trainable_weights}
    missing = [
        w.path for w in model.trainable_weights if id(w) not in covered
    ]
    if missing:
        raise NotImplementedError(
            f"Model {model.name!r} has trainable weights that no traced layer "
            f"call uses: {missing}. Their gradients would be missing from "
            "the Gram matrix."
        )


def gram_from_calls(
    calls, output_gradients, method="fast", dtype=tf.float32
):
    """Sum the Gram blocks of recorded layer calls into `[batch, batch]`.

    Blocks are formed from products in `dtype` and summed in float64.
    """
    return gram_and_kernel_gradients(
        calls, output_gradients, method, dtype
    )[0]


def gram_and_kernel_gradients(
    calls, output_gradients, method="fast", dtype=tf.float32
):
    """Sum the Gram blocks, and keep the kernel gradients formed on the way.

    Where a layer's per-example kernel gradients are materialised, their sum
    is the kernel's gradient of the summed loss, so a training step can use
    it in place of a second computation from the output gradient.

    Args:
        calls: `LayerCall`s from `traced_call`.
        output_gradients: gradient of the summed batch loss at each
            `call.output`.
        method: "fast" or "tape", as for `layer_gram`.
        dtype: the dtype of the blocks' products, from `product_dtype`.

    Returns:
        A pair: the `[batch, batch]` float64 Gram matrix (blocks formed in
        `dtype`, summed in float64), and a dict from `id(kernel)` to the
        float32 gradient of the summed loss with respect to that kernel,
        for the kernels whose per-example gradients were materialised.
    """
    gram = None
    kernel_gradients = {}
    for call, gradient in zip(calls, output_gradients):
        block = _layer_gram(
            call, gradient, method, kernel_gradients, dtype=dtype
        )
        block = tf.cast(block, tf.float64)
        gram = block if gram is None else gram + block
    return gram, kernel_gradients


# Models with at most this many trainable parameters get their Gram blocks
# from float64 products (`product_dtype`).
FLOAT64_PRODUCTS_MAX_PARAMETERS = 4096


def num_trainable_parameters(model):
    """Return P, the number of trainable parameters of `model`: the rows of
    J."""
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def product_dtype(num_parameters):
    """Return the dtype of the Gram blocks' products for a model with
    `num_parameters` trainable parameters: float64 up to
    `FLOAT64_PRODUCTS_MAX_PARAMETERS`, float32 above.

    J may have fewer independent columns than the batch has examples. Its
    rank is at most P, and often lower: the gradients of softmax
    cross-entropy at the logits sum to zero over the C classes, so a Dense
    head on d features has rank at most (d + 1)(C - 1). Float32 products
    leave the zero eigenvalues of such an F near 1e-8 λ_max, above the
    default tolerance of `tf_fisher.measures`, where they count as nonzero
    and set λ_min. Float64 products of the same float32 inputs leave them
    near 1e-16 λ_max. For a Dense(10) head on 15 features at batch 256, c_k
    was 8,046 from float32 products and 9.95 from float64 ones, as from a
    float64 J. A model this small has cheap products. For DenseNet-8
    (10,322 parameters) on 2 CPU cores, float64 products took the probed
    step at batch 512 from 1.28 to 1.47 times a plain step. So larger
    models keep float32, and `rank_warning` warns when a batch has at
    least P / 4 examples.

    NOTE: a larger model can still have a rank below the batch size and no
    warning. A Dense(10) head of 10,250 parameters on a frozen linear
    Conv2D gave rank 202 and c_k 26,542 at batch 256, where a float64 J
    has rank 153 and c_k near 19. With `eigenvalue_tolerance=1e-7` the
    probe counted rank 153 too.
    """
    if num_parameters <= FLOAT64_PRODUCTS_MAX_PARAMETERS:
        return tf.float64
    return tf.float32


def rank_warning(num_parameters, batch_size, dtype):
    """Return a warning message when a batch of `batch_size` examples may
    exceed the rank of J for a model with `num_parameters` trainable
    parameters whose blocks were formed from products in `dtype`, or None.
    """
    if tf.as_dtype(dtype) == tf.float64 or 4 * batch_size < num_parameters:
        return None
    return (
        f"The probed batch has {batch_size} examples and the model "
        f"{num_parameters} trainable parameters, so J may have fewer "
        "independent columns than the batch has examples (a softmax head "
        "on d features has rank at most (d + 1)(C - 1)). The Gram blocks "
        "were formed from float32 products, whose round-off leaves the "
        "zero eigenvalues near 1e-8 λ_max, so they may count as nonzero "
        "and set λ_min and c_k. Pass eigenvalue_tolerance=1e-7 "
        "(--eigenvalue_tolerance=1e-7) to drop them, or use smaller "
        "batches."
    )


# How many layers' backward passes, its own first, a Gram block may overlap
# with (`GramTaps`). Measured on 2 CPU cores (Intel Xeon, TensorFlow 2.21
# with oneDNN) at batch 128, in 40 interleaved rounds. ResNet-8's probed step
# took 1.39 times a plain step with 0, where each layer waits for its own
# block. It took 1.35 times with 1, 1.28 to 1.32 with 2 and 1.30 to 1.34
# with 4. ResNet-20's took 1.50 times with 0 and 1.38 with 2. With 2, the
# peak memory of the step grew by 9 MiB (ResNet-8) and 38 MiB (ResNet-20) at
# batch 128, and by 56 and 198 MiB at batch 512. With no waiting at all the
# peaks were the same as with 2.
# NOTE: measured on CPUs only. A GPU runs most ops of a step one after
# another on one stream, so there the overlap may save little time while it
# still keeps more tensors in memory.
DEFAULT_BLOCK_OVERLAP = 2


class GramTaps:
    """Identity taps on layer outputs that form the Gram blocks in backprop.

    `traced_call(..., taps=taps)` passes each recorded layer output through
    `tap`, an identity in the forward pass. In the backward pass the tap
    receives the gradient at the layer output, forms the layer's Gram block
    from it, and returns the block as the gradient of a `[batch, batch]`
    zero tensor in `sources`. A BatchNormalization layer in training mode
    runs through `batch_norm` instead, whose backward pass does the same.
    Except for Dense layers on vectors, the gradient moves on to the
    layer's own backward pass only once the block formed `block_overlap`
    blocks earlier in backprop exists, or its own block with 0. Along a
    chain of layers, at most `block_overlap` + 1 blocks are then pending.
    Layers on parallel branches, such as convolutions that read the same
    tensor, may form their blocks at the same time whatever the value.

    Args:
        tape: the `tf.GradientTape` that records the forward pass.
        gradient_scale: scalar factor from the gradient of the loss that the
            tape differentiates to the gradient of the summed per-example
            loss: the batch size for a batch mean, 1 for a sum.
        method: "fast" or "tape", as for `layer_gram`.
        dtype: the dtype of the blocks' products, from `product_dtype`.
        keep_kernel_gradients: if True, kernels whose per-example gradients
            a block materialises also get a source, whose gradient is the
            kernel's gradient of the differentiated loss.
        block_overlap: how many layers' backward passes, its own first, a
            block may overlap with. Layers count in the order that backprop
            reaches them, without Dense layers on vectors. With 0, each
            layer's backward pass waits for its own block, and along a chain
            the probe keeps one layer's temporaries at a time.

    Example:

    ```python
    with tf.GradientTape() as tape:
        taps = GramTaps(tape, gradient_scale=1.0)
        y_pred, calls = traced_call(model, x, taps=taps)
        total = tf.reduce_sum(per_example_losses(loss, y, y_pred))
    gram = taps.gram(tape.gradient(total, taps.sources))
    ```
    """

    def __init__(
        self, tape, gradient_scale, method="fast", keep_kernel_gradients=False,
        block_overlap=DEFAULT_BLOCK_OVERLAP, dtype=tf.float32,
    ):
        self._tape = tape
        self.set_gradient_scale(gradient_scale)
        self._method = method
        self._dtype = tf.as_dtype(dtype)
        self._keep_kernel_gradients = keep_kernel_gradients
        self.sources = []
        self._block_indices = []
        self._kernel_indices = {}
        self._block_overlap = block_overlap
        self._pending_blocks = collections.deque()

    def set_gradient_scale(self, gradient_scale):
        """Set `gradient_scale`; the blocks read it in the backward pass, so
        it may be set after the forward pass, once the loss is known."""
        self._scale = tf.cast(gradient_scale, tf.float32)

    def tap(self, call):
        """Return `call.output` through an identity that forms its block.

        A layer with several outputs (an `LSTM` with `return_state=True`)
        gets one identity over all of them, so its block gets the gradient
        at each.
        """
        batch = tf.shape(tf.nest.flatten(call.output)[0])[0]
        sources = [tf.zeros([batch, batch], self._dtype)]
        layer = call.layer
        keep_kernel = (
            self._keep_kernel_gradients
            and self._method == "fast"
            and _materialises_kernel(call)
        )
        if keep_kernel:
            sources.append(tf.zeros(layer.kernel.shape, tf.float32))
            self._kernel_indices[id(layer.kernel)] = len(self.sources) + 1
        for source in sources:
            self._tape.watch(source)
        self._block_indices.append(len(self.sources))
        self.sources.extend(sources)
        moments = None
        if (
            self._method == "fast"
            and isinstance(layer, keras.layers.BatchNormalization)
            and _is_closed_form(layer)
        ):
            # In the forward pass, where the layer computes the same ones.
            moments = _batch_moments(
                layer, call.inputs, _input_mask(call.inputs, call.kwargs)
            )
        outputs = tf.nest.flatten(call.output)
        identity = self._identity(call, len(outputs), keep_kernel, moments)
        tapped = identity(*outputs, *sources)
        for output, tapped_output in zip(outputs, tapped):
            _copy_keras_mask(output, tapped_output)
        return tf.nest.pack_sequence_as(call.output, tapped)

    def _identity(self, call, count, keep_kernel, moments):
        @tf.custom_gradient
        def identity(*tensors):
            outputs = tensors[:count]

            def backward(*upstreams):
                # An output that the loss does not reach has a zero gradient.
                upstreams = [
                    tf.zeros_like(output) if upstream is None else upstream
                    for output, upstream in zip(outputs, upstreams)
                ]
                upstream = tf.nest.pack_sequence_as(call.output, upstreams)
                # Every block is quadratic in the output gradient, so it is
                # formed from the gradient of the differentiated loss and
                # scaled once, with no full-size scaled copy of the gradient.
                kernel_gradients = {}
                block = _layer_gram(
                    _after(upstreams, call), upstream, self._method,
                    kernel_gradients, moments, self._dtype,
                )
                block *= tf.square(tf.cast(self._scale, self._dtype))
                waited = self._block_to_wait_for(block, call)
                gradients = [
                    _held_until(waited, gradient) for gradient in upstreams
                ]
                gradients.append(block)
                if keep_kernel:
                    gradients.append(
                        kernel_gradients.get(id(call.layer.kernel))
                    )
                return gradients

            return [tf.identity(output) for output in outputs], backward

        return identity

    def _block_to_wait_for(self, block, call):
        """Record `block` and return the block recorded `block_overlap`
        blocks before it, or None. The backward pass of the layer waits for
        the returned block. Call this once per block, in the order that
        backprop forms them.

        A Dense block on vectors needs only `[batch, batch]` temporaries, so
        it is left out: letting it overlap with the rest of backprop made
        the MLP step about 4% faster.
        """
        outputs = tf.nest.flatten(call.output)
        if isinstance(call.layer, keras.layers.Dense) and all(
            output.shape.rank == 2 for output in outputs
        ):
            return None
        self._pending_blocks.append(block)
        if len(self._pending_blocks) <= self._block_overlap:
            return None
        return self._pending_blocks.popleft()

    def fuses(self, layer, args, kwargs, training):
        """Return True when `batch_norm` runs this call of `layer`."""
        return (
            self._method == "fast"
            and training is True
            and _is_fusable_batch_norm(layer, args, kwargs)
        )

    def batch_norm(self, layer, inputs):
        """Run a BatchNormalization layer in training mode, with its Gram
        block formed in its own backward pass.

        The forward pass is the layer's: the same ops as Keras 3.15 uses,
        and the same update of the moving statistics. The backward pass
        forms the per-example sums Σ_space δ_i and Σ_space (x_i - μ) δ_i
        that the block needs, and takes the gradients of the input, γ and
        β from their batch sums. Keras' own backward pass would form those
        batch sums again from full-size tensors. The block counts in
        `block_overlap` as any other.

        This was measured on 2 CPU cores (Intel Xeon, TensorFlow 2.21 with
        oneDNN), in interleaved rounds, against forming the block beside
        Keras' backward pass. ResNet-8's probed step at batch 128 went from
        1.33 to 1.35 times a plain step down to 1.22 to 1.24. ResNet-20's
        went from 1.36 to 1.41 down to 1.29 to 1.31, and ResNet-8's at
        batch 512 from 1.59 to 1.68 down to 1.42 to 1.47. Peak memory
        changed by at most 25 MiB in that comparison. In new processes that
        ran one op at a time, ResNet-20's probed step at batch 512 peaked at
        975 MiB with this backward pass and at 973 to 981 MiB without.

        Returns:
            The layer output.
        """
        batch = tf.shape(inputs)[0]
        source = tf.zeros([batch, batch], self._dtype)
        self._tape.watch(source)
        self._block_indices.append(len(self.sources))
        self.sources.append(source)
        _check_batch_norm(layer)
        inputs = tf.convert_to_tensor(inputs)
        mean, variance = _batch_moments(layer, tf.stop_gradient(inputs))
        _update_moving_statistics(layer, mean, variance)
        gamma = beta = None
        if layer.scale:
            gamma = keras.ops.cast(layer.gamma, tf.float32)
        if layer.center:
            beta = keras.ops.cast(layer.beta, tf.float32)
        weights = [weight for weight in (gamma, beta) if weight is not None]

        # `source` and `weights` are arguments so that the tape sends their
        # gradients through `backward`. The forward pass reads γ and β from
        # `gamma` and `beta`, the same tensors.
        @tf.custom_gradient
        def normalize(x, source, *weights):
            del source, weights
            outputs = keras.ops.batch_normalization(
                x, mean, variance, axis=layer.axis, offset=beta, scale=gamma,
                epsilon=layer.epsilon,
            )
            call = LayerCall(layer, x, outputs)

            def backward(upstream):
                delta = tf.zeros_like(x) if upstream is None else upstream
                return self._batch_norm_backward(
                    call, _held_until(delta, x), delta, mean, variance, gamma
                )

            return outputs, backward

        return normalize(inputs, source, *weights)

    def _batch_norm_backward(self, call, inputs, delta, mean, variance, gamma):
        """Return the gradients of the input, of the block's source and of
        γ and β, in the order `batch_norm` passes them, given `delta` at
        the layer output."""
        layer = call.layer
        gamma_sums, beta_sums = _batch_norm_sums(
            layer, inputs, delta, mean, variance
        )
        contributions = _trainable_contributions(layer, gamma_sums, beta_sums)
        if contributions:
            block = _flat_gram(tf.concat(contributions, axis=1), self._dtype)
            block *= tf.square(tf.cast(self._scale, self._dtype))
        else:
            block = tf.zeros([tf.shape(inputs)[0]] * 2, self._dtype)
        gamma_gradient = tf.reduce_sum(gamma_sums, axis=0)
        beta_gradient = tf.reduce_sum(beta_sums, axis=0)

        # With N values per channel, x̂ = (x - μ) s and s = 1/sqrt(σ² + ε):
        # dx = γ s (δ - Σ δ / N - x̂ Σ x̂ δ / N), where Σ δ is β's gradient
        # and Σ x̂ δ is γ's.
        count = tf.cast(
            tf.reduce_prod(tf.gather(tf.shape(inputs), layer._reduction_axes)),
            tf.float32,
        )
        inverse_std = tf.math.rsqrt(variance + layer.epsilon)
        factor = inverse_std if gamma is None else gamma * inverse_std
        shape = _channel_shape(layer, inputs.shape.rank)

        # Formed only once the earlier block exists, from x - μ formed
        # again, so that no full-size tensor but δ waits for it.
        waited = self._block_to_wait_for(block, call)
        delta = _held_until(waited, delta)
        centered = _held_until(waited, inputs) - tf.reshape(mean, shape)
        input_gradient = (
            delta * tf.reshape(factor, shape)
            - centered * tf.reshape(
                factor * inverse_std * gamma_gradient / count, shape
            )
            - tf.reshape(factor * beta_gradient / count, shape)
        )

        gradients = [input_gradient, block]
        if layer.scale:
            gradients.append(gamma_gradient)
        if layer.center:
            gradients.append(beta_gradient)
        return gradients

    def gram(self, source_gradients):
        """Sum the blocks into the `[batch, batch]` float64 Gram matrix.

        Args:
            source_gradients: the gradients of `sources`, in order. A None
                block (a layer the loss does not reach) counts as zero.
        """
        blocks = [
            tf.cast(source_gradients[index], tf.float64)
            for index in self._block_indices
            if source_gradients[index] is not None
        ]
        return tf.add_n(blocks)

    def kernel_gradients(self, source_gradients):
        """Return a dict from `id(kernel)` to its gradient, for the kernels
        whose per-example gradients were materialised."""
        return {
            key: source_gradients[index]
            for key, index in self._kernel_indices.items()
            if source_gradients[index] is not None
        }


def _is_fusable_batch_norm(layer, args, kwargs):
    """Return True for a call of a BatchNormalization layer that
    `GramTaps.batch_norm` can run as Keras 3.15 runs it in training mode:
    one float32 input without a mask. Other calls run the layer itself.
    `GramTaps.batch_norm` rejects the settings that `_check_batch_norm`
    rejects, as the other routes do."""
    if not (
        isinstance(layer, keras.layers.BatchNormalization)
        and _is_closed_form(layer)
        and len(args) == 1
        and tf.is_tensor(args[0])
    ):
        return False
    inputs = args[0]
    return (
        layer.trainable
        and inputs.dtype == tf.float32
        and layer.compute_dtype == "float32"
        and layer.variable_dtype == "float32"
        and inputs.shape.rank is not None
        and all(value is None for value in kwargs.values())
        and _input_mask(inputs, kwargs) is None
    )


def _update_moving_statistics(layer, mean, variance):
    """Update the moving mean and variance of a BatchNormalization layer
    from the batch moments, as its training-mode call does in Keras 3.15."""
    momentum = layer.momentum
    layer.moving_mean.assign(
        keras.ops.cast(layer.moving_mean, mean.dtype) * momentum
        + mean * (1.0 - momentum)
    )
    layer.moving_variance.assign(
        keras.ops.cast(layer.moving_variance, variance.dtype) * momentum
        + variance * (1.0 - momentum)
    )


def _materialises_kernel(call):
    """Return True when the fast block of `call` forms per-example kernel
    gradients, as `_dense_gram` and `_conv_gram` decide from static shapes.
    """
    layer = call.layer
    is_linear = isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    if not (is_linear and _is_closed_form(layer) and layer.kernel.trainable):
        return False
    inputs, output = call.inputs, call.output
    if isinstance(layer, keras.layers.Dense):
        spatial = inputs.shape[1:-1]
        d_in = inputs.shape[-1]
    else:
        spatial = output.shape[1:-1]
        d_in = math.prod(layer.kernel_size) * inputs.shape[-1]
    if any(size is None for size in spatial) or not spatial:
        return False
    positions = math.prod(spatial)
    if positions == 1 and isinstance(layer, keras.layers.Dense):
        return False
    form = linear_gram_form(
        _static_batch(inputs), positions, d_in, output.shape[-1]
    )
    return form == "materialised"


def _held_until(block, upstream):
    """Return `upstream`, read only after `block` exists when `block` is
    not None.

    When `block` is the gradient itself, this keeps a backward-pass op that
    reads a forward tensor from running before the gradient arrives.
    """
    if block is None:
        return upstream
    with tf.control_dependencies([block]):
        return tf.identity(upstream)


def _after(tensor, call):
    """Return `call` with its input and output read only after `tensor`.

    Without the control dependency, ops of a block that do not need the
    output gradient, such as x - mean in BatchNormalization, may run as soon
    as the forward pass has made their inputs. Their full-size results then
    stay in memory until the gradient arrives. Measured on ResNet-20 at
    batch 128, that doubled the peak memory of the step.
    """
    def read_leaf_after(leaf):
        if not tf.is_tensor(leaf):
            return leaf
        copy = tf.identity(leaf)
        _copy_keras_mask(leaf, copy)
        return copy

    def read_after(structure):
        return tf.nest.map_structure(read_leaf_after, structure)

    with tf.control_dependencies(tf.nest.flatten(tensor)):
        inputs = read_after(call.inputs)
        output = read_after(call.output)
        args = read_after(tuple(call.args))
        kwargs = read_after(dict(call.kwargs))
    return LayerCall(call.layer, inputs, output, args, kwargs)


def _copy_keras_mask(source, target):
    """Give `target` the Keras mask of `source`, if it has one, so that the
    layers and the loss after a tap mask the same positions.

    NOTE: Keras 3.15 keeps the mask of a TensorFlow tensor in its
    `_keras_mask` attribute (`keras.src.backend.set_keras_mask`).
    """
    mask = getattr(source, "_keras_mask", None)
    if mask is not None:
        target._keras_mask = mask


def gram_matrix(model, loss, x, y, method="fast"):
    """Compute F = Jᵀ J for one batch, one layer at a time.

    Layers run in training mode, so BatchNormalization uses the batch
    statistics (and, as in any training-mode call, updates its moving
    statistics).

    Args:
        model: a Functional or built Sequential `keras.Model`.
        loss: a `keras.losses.Loss`, the name of one, or a callable
            returning unreduced per-example losses; the batch loss is their
            sum. A callable that returns one value for the whole batch
            counts as the mean over the batch, as in `FisherModel`. For a
            model with several outputs, a list or dict of such losses with
            the structure of the outputs.
        x: model input, `[batch, ...]`, or a list or dict of such inputs
            for a model with several.
        y: targets, `[batch, ...]`, or a list or dict of them with the
            structure of the outputs.
        method: "fast" (closed forms) or "tape" (per-layer tape).

    Returns:
        `[batch, batch]` float64 Gram matrix.

    Example:

    ```python
    model = tf_fisher.models.build_model("mlp", (32, 32, 1), 10)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gram = tf_fisher.gram_matrix(model, loss, images, labels)
    ```
    """
    if method not in ("fast", "tape"):
        raise ValueError(
            f"Invalid method={method!r}: expected 'fast' or 'tape'."
        )
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    num_parameters = num_trainable_parameters(model)
    dtype = product_dtype(num_parameters)
    with tf.GradientTape() as tape:
        taps = GramTaps(tape, gradient_scale=1.0, method=method, dtype=dtype)
        y_pred, calls = traced_call(model, x, training=True, taps=taps)
        total = _summed_loss(loss, y, y_pred)
    check_traced_weights(model, calls)
    matrix = taps.gram(tape.gradient(total, taps.sources))
    batch_size = matrix.shape[0]
    message = batch_size and rank_warning(num_parameters, batch_size, dtype)
    if message:
        warnings.warn(message, stacklevel=2)
    return matrix


def _summed_loss(loss, y, y_pred):
    """Return the sum of the per-example losses of every output."""
    if not tf.nest.is_nested(y_pred):
        pairs = [(loss, y, y_pred)]
    else:
        try:
            tf.nest.assert_same_structure(loss, y_pred)
            tf.nest.assert_same_structure(y, y_pred)
        except (TypeError, ValueError) as error:
            raise ValueError(
                "For a model with several outputs, gram_matrix needs a loss "
                "and a target for each output, in a list or dict with the "
                f"structure of the outputs. Received: outputs {_keys(y_pred)}, "
                f"losses {_keys(loss)} and targets {_keys(y)}."
            ) from error
        pairs = zip(
            tf.nest.flatten(loss), tf.nest.flatten(y), tf.nest.flatten(y_pred)
        )
    total = 0.0
    for output_loss, target, output in pairs:
        values = per_example_losses(output_loss, target, output)
        summed = tf.reduce_sum(values)
        if values.shape.rank == 0:
            # One value for the batch counts as its mean, as in FisherModel.
            summed *= tf.cast(tf.shape(output)[0], summed.dtype)
        total += summed
    return total


def _keys(structure):
    """Describe a list or dict of outputs, losses or targets for a message."""
    if isinstance(structure, dict):
        return f"keyed {sorted(structure)}"
    if isinstance(structure, (list, tuple)):
        return f"a {type(structure).__name__} of {len(structure)}"
    return f"one {type(structure).__name__}"


def flat_gradient(gradients, weights):
    """Concatenate the gradients of `weights` into one vector.

    A None gradient, of a weight that the loss does not reach, counts as
    zeros. (`tf.UnconnectedGradients.ZERO` fails on Keras 3 variables.)
    Sparse gradients, such as an `Embedding`'s, are made dense.
    """
    parts = [
        tf.zeros([math.prod(weight.shape)], weight.dtype)
        if gradient is None
        else tf.reshape(tf.convert_to_tensor(gradient), [-1])
        for weight, gradient in zip(weights, gradients)
    ]
    return tf.concat(parts, axis=0)


def per_example_gradients(model, loss, x, y):
    """Return J as `[batch, P]`, from a whole-model `tf.vectorized_map`.

    Each example runs through the model alone, so this equals the per-example
    contributions only for models without cross-example layers (no
    BatchNormalization in training mode). It keeps all of J in memory.
    """
    weights = model.trainable_weights

    def one_example(example):
        example_x, example_y = example
        with tf.GradientTape() as tape:
            y_pred = model(example_x[None], training=True)
            total = tf.reduce_sum(
                per_example_losses(loss, example_y[None], y_pred)
            )
        return flat_gradient(tape.gradient(total, weights), weights)

    return tf.vectorized_map(one_example, (x, y))


def whole_model_gram_matrix(model, loss, x, y):
    """Whole-model reference: J from `per_example_gradients`, then Jᵀ J.

    Valid for models without cross-example layers. Returns float64.
    """
    jacobian = tf.cast(per_example_gradients(model, loss, x, y), tf.float64)
    return _row_products(jacobian)


def loop_gram_matrix(model, loss, x, y):
    """Reference: one forward and backward pass per example, then Jᵀ J.

    This is how the authors' Lua Torch code formed J. Valid for models without
    cross-example layers; `x` may be a tensor or a nested structure of them,
    as a model with several inputs takes. Returns float64.
    """
    weights = model.trainable_weights
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    columns = []
    for i in range(int(tf.nest.flatten(x)[0].shape[0])):
        example = tf.nest.map_structure(
            lambda tensor, i=i: tensor[i : i + 1], x
        )
        with tf.GradientTape() as tape:
            y_pred = model(example, training=True)
            total = tf.reduce_sum(per_example_losses(loss, y[i : i + 1], y_pred))
        columns.append(flat_gradient(tape.gradient(total, weights), weights))
    jacobian = tf.cast(tf.stack(columns), tf.float64)
    return _row_products(jacobian)
