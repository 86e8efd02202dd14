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
layer's output. From those two tensors each layer's block follows:

* `Dense` and `Conv2D` (no groups): the weight gradient of example i is
  Σ_t a_it ⊗ g_it over output positions t, with a the layer input (for a
  convolution, the input patch) and g the gradient of the pre-activation
  output. The block is either the pairwise form
  Σ_{t,s} (a_it · a_js)(g_it · g_js), which for a single position is
  (A Aᵀ) ⊙ (G Gᵀ), or the Gram of the materialised per-example gradients,
  whichever costs fewer multiply-adds. The bias adds the Gram of Σ_t g_it.
* `BatchNormalization` in training mode couples the examples of a batch. As in
  the authors' code, example i contributes γ_i = Σ_space x̂_i · δ_i and
  β_i = Σ_space δ_i, with x̂ normalised by the batch statistics and δ the
  gradient of the batch loss at the layer output. These contributions sum to
  the batch gradient; for layers without cross-example coupling they equal the
  per-example gradients.
* Any other layer with trainable weights: the gradients of its weights for each
  example, from a `tf.GradientTape` around that layer alone, mapped over the
  batch with `tf.vectorized_map`. One warning names the layer class.

`gram_matrix` is the public entry point. `gram_matrix(..., method="tape")` (the
per-layer tape for every layer), `whole_model_gram_matrix` (a whole-model
`tf.vectorized_map`) and `loop_gram_matrix` (one backward pass per
example) compute the same matrix by slower, independent routes for tests and
benchmarks.
"""

import dataclasses
import warnings

import keras
import tensorflow as tf

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
        output: the output tensor, `[batch, ...]`.
    """

    layer: keras.layers.Layer
    inputs: object
    output: tf.Tensor


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


def traced_call(model, inputs, training=True):
    """Run `model` on `inputs` and record every call of a layer with weights.

    Nested `Functional` and `Sequential` models are traced through, so the
    records hold leaf layers only.

    Args:
        model: a Functional or built Sequential `keras.Model`.
        inputs: the model input, as `model(inputs)` takes it.
        training: the training flag passed to every layer that accepts one.

    Returns:
        A pair `(outputs, calls)`: the model outputs and a list of `LayerCall`
        in call order.

    Raises:
        ValueError: if the model is not a graph of layers.
    """
    calls = []
    outputs = _trace_graph(model, inputs, training, calls)
    return outputs, calls


def _trace_graph(model, inputs, training, calls):
    graph = _functional_of(model)
    if graph is None:
        raise ValueError(
            f"Cannot trace the layers of model {model.name!r} "
            f"({type(model).__name__}): only Functional models and Sequential "
            "models with a known input shape can be traced. Build the model "
            "with `keras.Input`, or use `whole_model_gram_matrix`."
        )

    def operation_fn(operation):
        def call(*args, **kwargs):
            if _functional_of(operation) is not None and isinstance(
                operation, keras.Model
            ):
                return _trace_graph(operation, args[0], training, calls)
            output = _call_with_training(operation, args, kwargs, training)
            if operation.trainable_weights:
                calls.append(LayerCall(operation, args[0], output))
            return output

        return call

    return graph._run_through_graph(inputs, operation_fn=operation_fn)


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
    if isinstance(loss, keras.losses.Loss):
        values = loss.call(y_true, y_pred)
    else:
        values = loss(y_true, y_pred)
    values = tf.convert_to_tensor(values)
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_sum(values, axis=list(range(1, values.shape.rank)))
    return values


def _pre_activation_gradient(layer, inputs, output_gradient):
    """Return the gradient at the output of `layer` before its activation."""
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return output_gradient
    pre_activation = _linear_output(layer, inputs)
    with tf.GradientTape() as tape:
        tape.watch(pre_activation)
        output = activation(pre_activation)
    return tape.gradient(output, pre_activation, output_gradients=output_gradient)


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


def linear_gram(inputs, gradients):
    """Gram block of a weight shared across positions, without bias.

    The weight gradient of example i is Σ_t a_it ⊗ g_it. The block is formed
    in whichever of two ways needs fewer multiply-adds for these shapes: the
    pairwise form Σ_{t,s} (a_it · a_js)(g_it · g_js), or materialising each
    example's `[d_in, d_out]` gradient and taking inner products.

    Args:
        inputs: `[batch, positions, d_in]` layer inputs (or input patches).
        gradients: `[batch, positions, d_out]` pre-activation gradients.

    Returns:
        `[batch, batch]` float32 Gram block.
    """
    batch = _static_batch(inputs)
    positions, d_in = inputs.shape[1], inputs.shape[2]
    d_out = gradients.shape[2]
    pairwise_cost = batch * batch * positions * positions * (d_in + d_out + 1)
    materialised_cost = (
        batch * positions * d_in * d_out + batch * batch * d_in * d_out
    )
    if positions == 1:
        a = inputs[:, 0, :]
        g = gradients[:, 0, :]
        return tf.matmul(a, a, transpose_b=True) * tf.matmul(
            g, g, transpose_b=True
        )
    if pairwise_cost <= materialised_cost:
        a_products = tf.einsum("itd,jsd->ijts", inputs, inputs)
        g_products = tf.einsum("itd,jsd->ijts", gradients, gradients)
        return tf.reduce_sum(a_products * g_products, axis=[2, 3])
    per_example = tf.einsum("itd,ite->ide", inputs, gradients)
    flat = tf.reshape(per_example, [tf.shape(per_example)[0], d_in * d_out])
    return tf.matmul(flat, flat, transpose_b=True)


def _bias_gram(gradients):
    summed = tf.reduce_sum(gradients, axis=1)
    return tf.matmul(summed, summed, transpose_b=True)


def _as_positions(tensor):
    """Reshape `[batch, ..., d]` to `[batch, positions, d]`."""
    depth = tensor.shape[-1]
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1, depth])


def _dense_gram(layer, inputs, output_gradient):
    gradient = _pre_activation_gradient(layer, inputs, output_gradient)
    a = _as_positions(inputs)
    g = _as_positions(gradient)
    gram = tf.zeros([tf.shape(a)[0]] * 2)
    if layer.kernel.trainable:
        gram += linear_gram(_with_static_positions(a, inputs), g)
    if layer.bias is not None and layer.bias.trainable:
        gram += _bias_gram(g)
    return gram


def _with_static_positions(flat, original):
    positions = 1
    for size in original.shape[1:-1]:
        positions = None if size is None or positions is None else (
            positions * size
        )
    if positions is not None:
        flat = tf.ensure_shape(flat, [None, positions, original.shape[-1]])
    return flat


def _conv_patches(layer, inputs):
    kernel_height, kernel_width = layer.kernel_size
    stride_height, stride_width = layer.strides
    rate_height, rate_width = layer.dilation_rate
    patches = tf.image.extract_patches(
        inputs,
        sizes=[1, kernel_height, kernel_width, 1],
        strides=[1, stride_height, stride_width, 1],
        rates=[1, rate_height, rate_width, 1],
        padding=layer.padding.upper(),
    )
    return patches


def _conv_gram(layer, inputs, output_gradient):
    gradient = _pre_activation_gradient(layer, inputs, output_gradient)
    patches = _conv_patches(layer, inputs)
    a = _with_static_positions(_as_positions(patches), patches)
    g = _with_static_positions(_as_positions(gradient), gradient)
    gram = tf.zeros([tf.shape(a)[0]] * 2)
    if layer.kernel.trainable:
        gram += linear_gram(a, g)
    if layer.bias is not None and layer.bias.trainable:
        gram += _bias_gram(g)
    return gram


def _normalized_inputs(layer, inputs):
    """Return x̂, the input of a BatchNormalization normalised by batch moments."""
    inputs = tf.cast(inputs, tf.float32)
    mean, variance = tf.nn.moments(inputs, axes=layer._reduction_axes)
    shape = [1] * inputs.shape.rank
    shape[layer.axis] = inputs.shape[layer.axis]
    mean = tf.reshape(mean, shape)
    variance = tf.reshape(variance, shape)
    return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon)


def _batch_norm_contributions(layer, inputs, output_gradient):
    """Per-example contributions `[batch, channels]` of γ and of β."""
    normalized = _normalized_inputs(layer, inputs)
    delta = tf.cast(output_gradient, tf.float32)
    space_axes = [
        axis for axis in layer._reduction_axes if axis != 0
    ]
    contributions = []
    if layer.scale and layer.gamma.trainable:
        contributions.append(
            tf.reduce_sum(normalized * delta, axis=space_axes)
        )
    if layer.center and layer.beta.trainable:
        contributions.append(tf.reduce_sum(delta, axis=space_axes))
    return contributions


def _batch_norm_gram(layer, inputs, output_gradient):
    _check_batch_norm(layer)
    gram = tf.zeros([tf.shape(inputs)[0]] * 2)
    for contribution in _batch_norm_contributions(
        layer, inputs, output_gradient
    ):
        gram += tf.matmul(contribution, contribution, transpose_b=True)
    return gram


def _check_batch_norm(layer):
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


def _is_closed_form(layer):
    if isinstance(layer, keras.layers.Conv2D):
        return (
            layer.groups == 1
            and layer.data_format == "channels_last"
            and layer.padding in ("same", "valid")
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None
        )
    if isinstance(layer, keras.layers.Dense):
        return not getattr(layer, "lora_enabled", False) and (
            getattr(layer, "quantization_mode", None) is None
        )
    return isinstance(layer, keras.layers.BatchNormalization)


def _closed_form_gram(layer, inputs, output_gradient):
    if isinstance(layer, keras.layers.BatchNormalization):
        return _batch_norm_gram(layer, inputs, output_gradient)
    if isinstance(layer, keras.layers.Conv2D):
        return _conv_gram(layer, inputs, output_gradient)
    return _dense_gram(layer, inputs, output_gradient)


def _per_example_layer_gradients(layer, inputs, output_gradient):
    """Flattened per-example weight gradients `[batch, weights]` of one layer.

    A `tf.GradientTape` around the layer alone, applied to one example and
    mapped over the batch. BatchNormalization is taken as the affine map
    γ x̂_i + β with x̂ fixed by the batch statistics, so its per-example
    gradients are the per-example contributions.
    """
    weights = layer.trainable_weights
    if isinstance(layer, keras.layers.BatchNormalization):
        _check_batch_norm(layer)
        inputs = _normalized_inputs(layer, inputs)

    def one_example(example):
        example_inputs, example_gradient = example
        batched = tf.nest.map_structure(lambda t: t[None], example_inputs)
        with tf.GradientTape() as tape:
            output = _apply_layer(layer, batched)
        gradients = tape.gradient(
            output,
            weights,
            output_gradients=example_gradient[None],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)

    return tf.vectorized_map(one_example, (inputs, output_gradient))


def _apply_layer(layer, inputs):
    if isinstance(layer, keras.layers.BatchNormalization):
        shape = [1] * inputs.shape.rank
        shape[layer.axis] = inputs.shape[layer.axis]
        output = inputs
        if layer.scale:
            output = output * tf.reshape(layer.gamma, shape)
        if layer.center:
            output = output + tf.reshape(layer.beta, shape)
        return output
    return _call_with_training(layer, (inputs,), {}, True)


def _tape_gram(layer, inputs, output_gradient):
    per_example = _per_example_layer_gradients(layer, inputs, output_gradient)
    return tf.matmul(per_example, per_example, transpose_b=True)


def _warn_fallback(layer):
    name = type(layer).__name__
    if name in _warned_layer_classes:
        return
    _warned_layer_classes.add(name)
    warnings.warn(
        f"tf_fisher has no closed-form Gram block for layers of class {name} "
        f"(first seen: {layer.name!r}); their per-example gradients come "
        "from a vectorized per-example tape, which is slower. Closed forms "
        "exist for Dense, Conv2D and BatchNormalization.",
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
    if method == "fast" and _is_closed_form(call.layer):
        return _closed_form_gram(call.layer, call.inputs, output_gradient)
    if method == "fast":
        _warn_fallback(call.layer)
    return _tape_gram(call.layer, call.inputs, output_gradient)


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
                f"Layer {call.layer.name!r} is called more than once in one "
                "forward pass; per-example Gram blocks of shared layers are "
                "not supported. Use `loop_gram_matrix` for such models."
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


def gram_from_calls(calls, output_gradients, method="fast"):
    """Sum the Gram blocks of recorded layer calls into `[batch, batch]`.

    Blocks are formed in float32 and summed in float64.
    """
    gram = None
    for call, gradient in zip(calls, output_gradients):
        block = tf.cast(layer_gram(call, gradient, method), tf.float64)
        gram = block if gram is None else gram + block
    return gram


def gram_matrix(model, loss, x, y, method="fast"):
    """Compute F = Jᵀ J for one batch, one layer at a time.

    Layers run in training mode, so BatchNormalization uses the batch
    statistics (and, as in any training-mode call, updates its moving
    statistics).

    Args:
        model: a Functional or built Sequential `keras.Model`.
        loss: a `keras.losses.Loss` or a callable returning unreduced
            per-example losses; the batch loss is their sum.
        x: model input, `[batch, ...]`.
        y: targets, `[batch, ...]`.
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
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        y_pred, calls = traced_call(model, x, training=True)
        total = tf.reduce_sum(per_example_losses(loss, y, y_pred))
    check_traced_weights(model, calls)
    output_gradients = tape.gradient(total, [c.output for c in calls])
    return gram_from_calls(calls, output_gradients, method)


def per_example_gradients(model, loss, x, y):
    """Return J as `[batch, P]`, from a whole-model `tf.vectorized_map`.

    Each example runs through the model alone, so this equals the per-example
    contributions only for models without cross-example layers (no
    BatchNormalization in training mode). It holds all of J in memory.
    """
    weights = model.trainable_weights

    def one_example(example):
        example_x, example_y = example
        with tf.GradientTape() as tape:
            y_pred = model(example_x[None], training=True)
            total = tf.reduce_sum(
                per_example_losses(loss, example_y[None], y_pred)
            )
        gradients = tape.gradient(
            total, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)

    return tf.vectorized_map(one_example, (x, y))


def whole_model_gram_matrix(model, loss, x, y):
    """Whole-model reference: J from `per_example_gradients`, then Jᵀ J.

    Valid for models without cross-example layers. Returns float64.
    """
    jacobian = tf.cast(per_example_gradients(model, loss, x, y), tf.float64)
    return tf.matmul(jacobian, jacobian, transpose_b=True)


def loop_gram_matrix(model, loss, x, y):
    """Reference: one forward and backward pass per example, then Jᵀ J.

    This is how the authors' Lua Torch code formed J. Valid for models without
    cross-example layers. Returns float64.
    """
    weights = model.trainable_weights
    columns = []
    for i in range(int(x.shape[0])):
        with tf.GradientTape() as tape:
            y_pred = model(x[i : i + 1], training=True)
            total = tf.reduce_sum(per_example_losses(loss, y[i : i + 1], y_pred))
        gradients = tape.gradient(
            total, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        columns.append(
            tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)
        )
    jacobian = tf.cast(tf.stack(columns), tf.float64)
    return tf.matmul(jacobian, jacobian, transpose_b=True)
