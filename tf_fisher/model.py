"""A Keras model wrapper whose training step also measures the Gram matrix."""

import math

import keras
import tensorflow as tf

from tf_fisher import gram
from tf_fisher import measures


class _ProbeState:
    """Variables that carry one probe's results out of the compiled step.

    Kept outside Keras attribute tracking on purpose: they are not weights and
    must not be saved, trained or counted as parameters.
    """

    def __init__(self, keys):
        self.step_in_epoch = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="step_in_epoch"
        )
        self.values = {
            key: tf.Variable(math.nan, dtype=tf.float64, trainable=False)
            for key in keys
        }


class _ResetProbeSchedule(keras.callbacks.Callback):
    """Restarts the probe counter at each epoch, so probes fall on steps
    1, 1 + N, 1 + 2N, ... of every epoch."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def on_epoch_begin(self, epoch, logs=None):
        self._state.step_in_epoch.assign(0)


class FisherModel(keras.Model):
    """Trains a Keras model and measures its per-example Gram matrix.

    Every step is an ordinary training step: forward pass, `compute_loss`,
    gradients, `optimizer.apply`. On steps 1, 1 + N, 1 + 2N, ... of each epoch
    (N = `fisher_interval`) the same compiled step also forms the Gram matrix
    F = Jᵀ J of the per-example gradients of the current batch, before the
    update, from the layer inputs and output gradients of that one forward and
    backward pass, and stores its measures in `probe_values`. A
    `tf_fisher.FisherCallback` reads them after each probed step.

    The Gram matrix uses the sum convention: column i of J is the gradient of
    example i's loss, so J is B times what the mean-reduced training loss
    gives. The compiled loss must therefore reduce by
    "sum_over_batch_size" (the Keras default), and loss scaling for mixed
    precision is not supported. Weight decay, when set, is
    added to the gradients as `weight_decay * w` before the optimizer (L2
    regularisation, as Torch's SGD applies it) and is not part of J.

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
        **kwargs,
    ):
        kwargs.setdefault("name", f"fisher_{model.name}")
        super().__init__(**kwargs)
        _check_model(model)
        _check_positive_int("fisher_interval", fisher_interval)
        if not 0 <= eigenvalue_tolerance < 1:
            raise ValueError(
                "Invalid eigenvalue_tolerance: expected a number in [0, 1). "
                f"Received: eigenvalue_tolerance={eigenvalue_tolerance}"
            )
        if weight_decay < 0:
            raise ValueError(
                "Invalid weight_decay: expected a number >= 0. "
                f"Received: weight_decay={weight_decay}"
            )
        if gram_method not in ("fast", "tape"):
            raise ValueError(
                "Invalid gram_method: expected 'fast' or 'tape'. "
                f"Received: gram_method={gram_method!r}"
            )
        self.network = model
        self.fisher_interval = int(fisher_interval)
        self.eigenvalue_tolerance = float(eigenvalue_tolerance)
        self.weight_decay = float(weight_decay)
        self.gram_method = gram_method
        self._probe = _ProbeState(measures.PROBE_KEYS)

    @property
    def probe_values(self):
        """Dict of float64 `tf.Variable`s holding the last probe's measures,
        keyed by `tf_fisher.measures.PROBE_KEYS`."""
        return self._probe.values

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def compile(self, *args, **kwargs):
        loss = kwargs.get("loss", args[1] if len(args) > 1 else None)
        reduction = getattr(loss, "reduction", "sum_over_batch_size")
        if reduction != "sum_over_batch_size":
            raise ValueError(
                "FisherModel needs a loss reduced by 'sum_over_batch_size' "
                "(the Keras default), because the Gram matrix rescales its "
                f"output gradients by the batch size. Received: "
                f"reduction={reduction!r}"
            )
        if kwargs.get("steps_per_execution", 1) != 1:
            raise ValueError(
                "FisherModel needs steps_per_execution=1, so that callbacks "
                "see every probed step. Received: "
                f"steps_per_execution={kwargs['steps_per_execution']}"
            )
        super().compile(*args, **kwargs)

    def fit(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        callbacks.insert(0, _ResetProbeSchedule(self._probe))
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        weights = self.trainable_variables

        # Forward and backward, recording each layer's input and output.
        with tf.GradientTape() as tape:
            y_pred, calls = gram.traced_call(self.network, x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            # Keras' own train_step tracks the loss the same way.
            self._loss_tracker.update_state(
                loss, sample_weight=tf.shape(y_pred)[0]
            )
        gram.check_traced_weights(self.network, calls)
        gradient_list = tape.gradient(
            loss, list(weights) + [call.output for call in calls]
        )
        weight_gradients = gradient_list[: len(weights)]
        output_gradients = gradient_list[len(weights) :]

        # Probe on steps 0, N, 2N, ... of the epoch, before the update.
        step = self._probe.step_in_epoch
        tf.cond(
            tf.equal(step % self.fisher_interval, 0),
            lambda: self._record_probe(calls, output_gradients, y_pred),
            lambda: tf.constant(False),
        )
        step.assign_add(1)

        # Update.
        if self.weight_decay:
            weight_gradients = [
                g + self.weight_decay * tf.cast(w, g.dtype)
                for g, w in zip(weight_gradients, weights)
            ]
        self.optimizer.apply(weight_gradients, weights)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _record_probe(self, calls, output_gradients, y_pred):
        batch_size = tf.cast(tf.shape(y_pred)[0], tf.float32)
        # The compiled loss is a batch mean: times B gives the summed loss.
        summed_loss_gradients = [g * batch_size for g in output_gradients]
        matrix = gram.gram_from_calls(
            calls, summed_loss_gradients, self.gram_method
        )
        statistics = measures.probe_statistics(
            matrix, self.eigenvalue_tolerance
        )
        for key, value in statistics.items():
            self._probe.values[key].assign(tf.cast(value, tf.float64))
        return tf.constant(True)

    def build(self, input_shape=None):
        # The wrapped network is already built; nothing to create here.
        self.built = True


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


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Invalid {name}: expected a positive integer. "
            f"Received: {name}={value!r}"
        )
