"""A Keras model wrapper whose training step also measures the Gram matrix."""

import math
import numbers
import warnings

import keras
import tensorflow as tf

from tf_fisher import gram
from tf_fisher import measures


class _ProbeState:
    """The probe schedule and the variable that carries one probe's results
    out of the compiled step.

    Kept outside Keras attribute tracking on purpose: the variable is not a
    weight and must not be saved, trained or counted as parameters. One
    vector, rather than a variable per value, costs the step one assignment
    and the host one read.

    Attributes:
        step_in_epoch: 0-based index of the next step within its epoch, a
            Python int counted on the host.
        keys: names of the values, in the order of `vector`.
        vector: float64 `tf.Variable` of shape `[len(keys)]`, NaN before the
            first probe.
    """

    def __init__(self, keys):
        self.step_in_epoch = 0
        self.keys = tuple(keys)
        self.vector = tf.Variable(
            tf.fill([len(self.keys)], tf.constant(math.nan, tf.float64)),
            trainable=False,
            name="probe_values",
        )

    def assign(self, statistics):
        """Store a dict of scalar tensors keyed by `keys`."""
        self.vector.assign(
            tf.stack([tf.cast(statistics[key], tf.float64) for key in self.keys])
        )

    def read(self):
        """Return the values as a dict of Python floats, in one host copy."""
        return dict(zip(self.keys, self.vector.numpy().tolist()))


class _ResetProbeSchedule(keras.callbacks.Callback):
    """Restarts the probe counter at each epoch, so probes fall on steps
    1, 1 + N, 1 + 2N, ... of every epoch."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def on_epoch_begin(self, epoch, logs=None):
        self._state.step_in_epoch = 0


@keras.saving.register_keras_serializable(package="tf_fisher")
class FisherModel(keras.Model):
    """Trains a Keras model and measures its per-example Gram matrix.

    Every step is an ordinary training step: forward pass, `compute_loss`,
    gradients, `optimizer.apply`. On steps 1, 1 + N, 1 + 2N, ... of each epoch
    (N = `fisher_interval`) a second compiled step runs instead, which also
    forms the Gram matrix F = Jᵀ J of the per-example gradients of the
    current batch, before the update, from the layer inputs and output
    gradients of that one forward and backward pass, and stores its measures
    in `probe_values`. The host counts the steps and calls one compiled
    function or the other, so steps without a probe run the plain step and
    pay nothing for the measures. A `tf_fisher.FisherCallback` reads the
    measures after each probed step. The probed step is never compiled with
    XLA: with `compile(jit_compile=True)`, which Keras also chooses by
    itself on a machine with a GPU (unless a distribution strategy is set
    or a layer does not support XLA), only the plain step, `evaluate` and
    `predict` are.

    The Gram matrix uses the sum convention: column i of J is the gradient of
    example i's loss, so J is B times what the mean-reduced training loss
    gives. The compiled loss, and each output's loss of a model with
    several outputs, must therefore reduce by "sum_over_batch_size" (the
    Keras default) or "mean", which Keras computes the same way. `compile`
    rejects other reductions, loss scaling for mixed precision and a
    distribution strategy with more than one replica. Weight
    decay, when set, is added to the gradients as `weight_decay * w` before
    the optimizer (L2 regularisation, as Torch's SGD applies it) and is not
    part of J.

    Args:
        model: a Functional or built Sequential `keras.Model` to train.
        fisher_interval: N, steps between probes within an epoch; 1 probes
            every step.
        eigenvalue_tolerance: eigenvalues at most this fraction of λ_max
            count as zero; 0 keeps every positive eigenvalue, as the
            authors' code does.
        weight_decay: L2 coefficient added to the gradients of all trainable
            weights.
        gram_method: "fast" (closed-form blocks for Dense, Conv2D,
            BatchNormalization) or "tape" (per-layer per-example tape).
        block_overlap: how many layers' backward passes, its own first, a
            layer's Gram block may overlap with in a probed step. With 0 the
            probe keeps one layer's temporaries at a time, such as the
            per-example gradients of a convolution, and each unit more adds
            up to one more layer's. On 2 CPU cores the default 2 ran
            ResNet-8's probed step 5% to 8% faster than 0 at batch 128.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    inputs = keras.Input((32, 32, 1))
    hidden = keras.layers.Dense(64, activation="relu")(
        keras.layers.Flatten()(inputs))
    network = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model = tf_fisher.FisherModel(network, fisher_interval=10)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=2,
                        callbacks=[tf_fisher.FisherCallback("run/")])
    history.history["mean_condition_number"]
    ```
    """

    def __init__(
        self,
        model,
        fisher_interval=50,
        eigenvalue_tolerance=measures.DEFAULT_TOLERANCE,
        weight_decay=0.0,
        gram_method="fast",
        block_overlap=gram.DEFAULT_BLOCK_OVERLAP,
        **kwargs,
    ):
        kwargs.setdefault("name", f"fisher_{model.name}")
        super().__init__(**kwargs)
        _check_model(model)
        check_arguments(
            fisher_interval, eigenvalue_tolerance, weight_decay, gram_method,
            block_overlap,
        )
        self.network = model
        self.fisher_interval = int(fisher_interval)
        self.eigenvalue_tolerance = float(eigenvalue_tolerance)
        self.weight_decay = float(weight_decay)
        self.gram_method = gram_method
        self.block_overlap = int(block_overlap)
        self._probe = _ProbeState(measures.PROBE_KEYS)
        self._warned_rank = False
        # The wrapped network is built, and this model has no weights of
        # its own.
        self.built = True

    @property
    def probe_values(self):
        """Dict of float64 scalar tensors, the last probe's measures keyed by
        `tf_fisher.measures.PROBE_KEYS`, read when the property is read."""
        vector = self._probe.vector.read_value()
        return {key: vector[i] for i, key in enumerate(self._probe.keys)}

    def read_probe_values(self):
        """Return the last probe's measures as a dict of Python floats.

        One read copies them all to the host, which is cheaper than reading
        each of `probe_values` in turn. The first probe whose batch may
        exceed the rank of J warns once (`tf_fisher.gram.rank_warning`).
        """
        values = self._probe.read()
        if not self._warned_rank and values["batch_size"] > 0:
            num_parameters = gram.num_trainable_parameters(self)
            message = gram.rank_warning(
                num_parameters, int(values["batch_size"]),
                gram.product_dtype(num_parameters),
            )
            if message is not None:
                self._warned_rank = True
                warnings.warn(message, stacklevel=2)
        return values

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def compile(self, *args, **kwargs):
        loss = kwargs.get("loss", args[1] if len(args) > 1 else None)
        # A dict or list contains the loss of each output.
        for output_loss in tf.nest.flatten(loss):
            reduction = getattr(
                output_loss, "reduction", "sum_over_batch_size"
            )
            # Keras 3.15 reduces "mean" exactly as "sum_over_batch_size".
            if reduction not in ("sum_over_batch_size", "mean"):
                raise ValueError(
                    "FisherModel needs a loss reduced by "
                    "'sum_over_batch_size' (the Keras default) or 'mean', "
                    "because the Gram matrix rescales its output gradients "
                    f"by the batch size. Received: reduction={reduction!r} "
                    "in loss "
                    f"{getattr(output_loss, 'name', output_loss)!r} "
                    f"({type(output_loss).__name__})"
                )
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1:
            # Each replica would form the Gram matrix of its own share of
            # the batch, and Keras would divide the tracked loss by the
            # number of replicas.
            raise ValueError(
                "FisherModel measures the Gram matrix of a whole batch, so "
                "it trains on one device. Received: a "
                f"{type(self.distribute_strategy).__name__} with {replicas} "
                "replicas. Build and compile the model outside the "
                "strategy's scope, or under "
                "tf.distribute.OneDeviceStrategy."
            )
        if kwargs.get("steps_per_execution", 1) != 1:
            raise ValueError(
                "FisherModel needs steps_per_execution=1, so that callbacks "
                "see every probed step. Received: "
                f"steps_per_execution={kwargs['steps_per_execution']}"
            )
        optimizer = kwargs.get("optimizer", args[0] if args else None)
        adds_loss_scaling = kwargs.get("auto_scale_loss", True) and (
            self.dtype_policy.name == "mixed_float16"
        )
        # Checked before Keras compiles, so that a rejected call leaves no
        # compiled model behind.
        if adds_loss_scaling or isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            if not isinstance(optimizer, str):
                optimizer = type(optimizer).__name__
            raise TypeError(
                "FisherModel does not support loss scaling: its training "
                "steps take the gradients of the unscaled loss, which a "
                "LossScaleOptimizer would divide by the loss scale. "
                f"Received: optimizer {optimizer!r} with dtype policy "
                f"{self.dtype_policy.name!r}. Pass a plain optimizer and "
                "train in float32, or pass auto_scale_loss=False to compile."
            )
        super().compile(*args, **kwargs)

    def fit(self, *args, callbacks=None, **kwargs):
        reset = _ResetProbeSchedule(self._probe)
        if isinstance(callbacks, keras.callbacks.CallbackList):
            # Keras runs a CallbackList as given, so the reset joins it,
            # once however many fit calls reuse it.
            if not any(
                isinstance(callback, _ResetProbeSchedule)
                and callback._state is self._probe
                for callback in callbacks.callbacks
            ):
                reset.set_model(self)
                callbacks.callbacks.insert(0, reset)
        else:
            callbacks = [reset, *(callbacks or [])]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def make_train_function(self, force=False):
        """Compile the plain and the probed step, and pick one on each call.

        Probes fall on steps 0, N, 2N, ... of the epoch, counted on the
        host, so choosing costs no device round trip.
        """
        if self.train_function is not None and not force:
            return self.train_function
        # NOTE: `_make_function` is the private helper behind Keras 3's own
        # `make_train_function` (TensorFlow backend, checked on Keras 3.15).
        plain_function = self._make_function(self.train_step)
        probed_function = self._make_probed_function()
        state = self._probe

        def train_function(iterator):
            probe = measures.is_probe_step(
                state.step_in_epoch, self.fisher_interval
            )
            state.step_in_epoch += 1
            if probe:
                return probed_function(iterator)
            return plain_function(iterator)

        self.train_function = train_function
        return train_function

    def _make_probed_function(self):
        """Compile the probed step, without XLA whatever `jit_compile` is.

        Compiled with XLA on 2 CPU cores, the MLP's probed step at batch
        128 took 35 ms against 6 ms for a plain XLA step, and ResNet-8's
        5.5 s against 0.18 s. XLA's `tf.linalg.eigvalsh` alone took 32 ms
        for a 128 x 128 matrix, against 1.6 ms without XLA. Plain steps
        still follow `jit_compile`.

        NOTE: timed on CPUs only. Whether XLA would run the probed step
        faster on a GPU is not known.
        """
        jit_compile = self.jit_compile
        # `_make_function` reads `jit_compile` once, when it builds the
        # step.
        self.jit_compile = False
        try:
            return self._make_function(self.probed_train_step)
        finally:
            # NOTE: Keras 3.15's private attribute behind `jit_compile`. Its
            # setter would check again whether the model supports XLA, and
            # could turn it off, with a warning, for a plain step that
            # `_make_function` has already compiled with XLA.
            self._jit_compile = jit_compile

    def train_step(self, data):
        """Run one training step without a probe, as `keras.Model` does."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.network(x, training=True)
            loss = self._tracked_loss(x, y, y_pred, sample_weight)
        weights = self.trainable_variables
        self._apply_gradients(tape.gradient(loss, weights), weights)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def probed_train_step(self, data):
        """Run one training step that also measures the Gram matrix.

        One forward and one backward pass give both the weight gradients and
        the Gram matrix of the batch (`_gradients_and_gram`). The measures
        are stored before the update.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_variables
        y_pred, weight_gradients, matrix = self._gradients_and_gram(
            x, y, sample_weight
        )
        statistics = measures.probe_statistics(
            matrix, self.eigenvalue_tolerance,
            max_rank=gram.num_trainable_parameters(self),
        )
        self._probe.assign(statistics)
        self._apply_gradients(weight_gradients, weights)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _gradients_and_gram(self, x, y, sample_weight):
        """Run the forward and backward pass of a probed step.

        Every layer output passes through a `tf_fisher.gram.GramTaps` tap,
        which forms the layer's Gram block during backprop. Where a block
        materialises per-example kernel gradients, their sum replaces the
        kernel's gradient from the layer's own backward pass, which is then
        never computed. That is skipped when the loss has regularisation
        terms, which the per-example gradients leave out. Benchmarks
        override this method to time other ways of forming the matrix.

        Returns:
            The model output, the list of gradients of the loss with respect
            to `trainable_variables`, and the `[batch, batch]` float64 Gram
            matrix of the per-example gradients of the summed loss.
        """
        weights = self.trainable_variables
        with tf.GradientTape() as tape:
            taps = gram.GramTaps(
                tape,
                gradient_scale=1.0,
                method=self.gram_method,
                keep_kernel_gradients=True,
                block_overlap=self.block_overlap,
                dtype=gram.product_dtype(gram.num_trainable_parameters(self)),
            )
            y_pred, calls = gram.traced_call(
                self.network, x, training=True, taps=taps
            )
            loss = self._tracked_loss(x, y, y_pred, sample_weight)
        # The compiled loss is a mean over its loss values: times their
        # number it gives the summed loss.
        taps.set_gradient_scale(self._loss_value_count(x, y, y_pred))
        gram.check_traced_weights(self.network, calls)
        gradient_list = tape.gradient(loss, list(weights) + taps.sources)
        weight_gradients = gradient_list[: len(weights)]
        source_gradients = gradient_list[len(weights) :]
        if not self.losses:
            kernel_gradients = taps.kernel_gradients(source_gradients)
            weight_gradients = [
                kernel_gradients.get(id(w), g)
                for w, g in zip(weights, weight_gradients)
            ]
        return y_pred, weight_gradients, taps.gram(source_gradients)

    def _loss_value_count(self, x, y, y_pred):
        """Return the number of loss values the compiled loss averages.

        With "sum_over_batch_size", Keras divides the sum of the loss values
        by their number. That is B when each example has one value, and B·T
        when an output has T positions per example (a label per time step).
        When the output has a Keras mask, only the unmasked values count.
        The per-example loss, as in `tf_fisher.gram.per_example_losses`, is
        the sum of that example's values.

        Raises:
            NotImplementedError: for a model with several outputs, one of
                which has more than one loss value per example, as the
                outputs' means then have different divisors.
        """
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        losses = [
            loss for loss in tf.nest.flatten(self.loss) if loss is not None
        ]
        if tf.nest.is_nested(y_pred):
            for output in tf.nest.flatten(y_pred):
                if output.shape.rank is not None and output.shape.rank > 2:
                    raise NotImplementedError(
                        "FisherModel supports several outputs only when "
                        "each has one loss value per example, that is "
                        "outputs of shape [batch, classes]. Received an "
                        f"output of shape {output.shape}."
                    )
            return batch
        if len(losses) != 1:
            return batch
        return gram.loss_value_count(losses[0], y, y_pred)

    def _tracked_loss(self, x, y, y_pred, sample_weight):
        loss = self.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=True,
        )
        # Keras' own train_step tracks the loss the same way, weighted by
        # the batch size, which it reads from the first input: `y_pred` is
        # a dict or list for a model with several outputs.
        self._loss_tracker.update_state(
            loss, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0]
        )
        return loss

    def _apply_gradients(self, gradients, weights):
        if self.weight_decay:
            gradients = [
                g + self.weight_decay * tf.cast(w, g.dtype)
                for g, w in zip(gradients, weights)
            ]
        self.optimizer.apply(gradients, weights)

    def get_config(self):
        """Return the arguments of the model, with the wrapped network
        serialized, so that `save` and `keras.models.load_model` work."""
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.network),
            "fisher_interval": self.fisher_interval,
            "eigenvalue_tolerance": self.eigenvalue_tolerance,
            "weight_decay": self.weight_decay,
            "gram_method": self.gram_method,
            "block_overlap": self.block_overlap,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)

    def compile_from_config(self, config):
        """Compile with a configuration from `get_compile_config`, as Keras
        does when it loads a saved model.

        Keras skips this for a class that overrides `compile`. This class's
        `compile` only checks the arguments before Keras' own, so the saved
        configuration compiles the same way.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        # The variables that the saved optimizer state is loaded into.
        self.optimizer.build(self.trainable_variables)

    def build(self, input_shape=None):
        # The wrapped network is already built; nothing to create here.
        self.built = True


def check_arguments(
    fisher_interval, eigenvalue_tolerance, weight_decay, gram_method,
    block_overlap=gram.DEFAULT_BLOCK_OVERLAP,
):
    """Raise ValueError, naming the argument and its value, unless
    `FisherModel` accepts these arguments.

    A program that builds many models calls this first, so that a bad value
    stops it before the first model trains.
    """
    _check_int("fisher_interval", fisher_interval, minimum=1)
    if not _is_real(eigenvalue_tolerance) or not 0 <= eigenvalue_tolerance < 1:
        raise ValueError(
            "Invalid eigenvalue_tolerance: expected a number in [0, 1). "
            f"Received: eigenvalue_tolerance={eigenvalue_tolerance!r}"
        )
    if not _is_real(weight_decay) or not 0 <= weight_decay < math.inf:
        raise ValueError(
            "Invalid weight_decay: expected a finite number >= 0. "
            f"Received: weight_decay={weight_decay!r}"
        )
    if gram_method not in ("fast", "tape"):
        raise ValueError(
            "Invalid gram_method: expected 'fast' or 'tape'. "
            f"Received: gram_method={gram_method!r}"
        )
    _check_int("block_overlap", block_overlap, minimum=0)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "FisherModel wraps a keras.Model. Received: "
            f"model of type {type(model).__name__}"
        )
    if not gram.can_trace(model):
        raise ValueError(
            f"FisherModel cannot trace the layers of {model.name!r} "
            f"({type(model).__name__}): it needs a Functional model, or a "
            "Sequential model built with an input shape. Rebuild it with "
            "`keras.Input`."
        )
    # NOTE: `_flatten_layers` is the private Keras 3.15 walk over a model and
    # every layer it tracks, nested models included.
    for layer in model._flatten_layers(include_self=False):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"FisherModel does not support activity regularization: "
                f"layer {layer.name!r} ({type(layer).__name__}) has an "
                "activity_regularizer. Its gradient flows back through the "
                "layers before it and would enter their per-example "
                "gradients. Remove it; kernel and bias regularizers are "
                "supported and are left out of the Gram matrix."
            )


def _is_real(value):
    """Return True for an int or float, NumPy's included, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name, value, minimum):
    """Raise ValueError unless `value` is an integer, NumPy's included but
    not a bool, of at least `minimum`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        expected = "a positive integer" if minimum == 1 else (
            f"an integer >= {minimum}"
        )
        raise ValueError(
            f"Invalid {name}: expected {expected}. Received: {name}={value!r}"
        )
