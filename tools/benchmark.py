"""Time the probed training step against a plain step and two slower routes.

For each model and batch size the tool times, in one process and
interleaved in rounds of shuffled order so that machine noise hits all of
them alike:

* `plain`: the network alone, compiled by Keras (its own `train_step`).
  Like every variant, it runs as `fit` runs a step: one call of the
  model's `train_function` on an iterator whose batch size is unknown when
  the step is traced, then a copy of the loss and metrics to the host;
* `unprobed`: a `tf_fisher.FisherModel` step that takes no probe;
* `fast`: a `FisherModel` step that takes a probe (`fisher_interval=1`),
  with the Gram matrix from the per-layer closed forms of `tf_fisher.gram`,
  including the host read of the recorded values;
* `whole_model`: the same probed step with the Gram matrix from a
  whole-model `tf.vectorized_map` of per-example gradients
  (`tf_fisher.gram.per_example_gradients`) and one float32 matmul;
* `loop`: the same probed step with the Gram matrix from a compiled loop
  that runs one forward and backward pass per example, as Liao, Drummond,
  Reid and Carneiro ("Approximate Fisher Information Matrix to Characterise
  the Training of Deep Neural Networks", IEEE TPAMI 2020) formed J.

All variants share the optimizer (SGD, momentum 0.9, Nesterov), the loss
(sparse categorical cross-entropy on logits) and the accuracy metric, and
each has its own copy of the network, built with the same seed. All are
compiled with `--jit_compile`: with "auto", the default, Keras uses XLA
only on a machine with a GPU, and `FisherModel` compiles its probed steps
without XLA in any case. Every step runs on the same batch of the embedded
MNIST digits (32 x 32 x 1; copied to 3 channels for the CIFAR-shaped
ResNet-20). For networks with BatchNormalization the two reference routes
run each example through BN alone, so they time the work of those routes,
not the same numbers.

Reported per model and batch size: the median wall time of a step for each
variant, its ratio to `plain`, the median process CPU time and the peak
memory of a step. The `unprobed` model also takes one step right after
each `fast` step, reported as the step after a probe. The epoch overhead
of probing every N = `--interval` steps is
((fast - plain) + (after probe - unprobed)) / (N plain): the probed step's
extra time plus any slow-down it leaves to the next step, over N plain
steps. The table also gives the smallest N that keeps the overhead at most
`--overhead_target`. The formula takes the other steps to cost a plain
step, because they run the same ops. The `unprobed` ratio shows how close
the two were in the run.

Where `fast` is timed, the tool also times the eigenvalues alone, on the
float64 Gram matrix of the same batch: `tf.linalg.eigvalsh`, which the
probed step runs, and LAPACK's `syevd` through SciPy (`time_eigenvalues`).
The exact spectrum is the part of the probe that grows as B^3, and this
second table shows what the faster of the two would add to an epoch at N
by itself, next to what the whole probe adds.

Memory is the peak of the bytes that TensorFlow's CPU allocator holds for
tensors during one step minus the bytes it held just before it, in MiB
(2^20 bytes), from the allocator's statistics
(`tf.config.experimental.get_memory_info`). It counts activations,
gradients and temporaries, not the weights and optimizer slots held between
steps, nor memory that TensorFlow's operations allocate outside tensors.
With its default allocator and oneDNN on, TensorFlow 2.21 serves tensors
under 256 KiB outside the counted allocator, which would leave out every
float64 B x B matrix below B = 182. So the tool measures memory in a separate
process for each model and batch size, started with
TF_CPU_ALLOCATOR_USE_BFC=1: there TensorFlow's BFC allocator serves, and
counts, every tensor. The timed steps keep the default allocator, the one
training runs with. The BFC allocator counts the chunks that contain
tensors, rounded up to 256 bytes. A chunk it reuses can be up to twice the
size of the tensor put in it. The resident set size cannot show the peak,
because the allocator keeps freed memory for reuse. The peak depends on
which ops run at the same time, so it moves between processes. The memory
process inherits the environment, and TF_NUM_INTEROP_THREADS=1 there runs
one op at a time, which made its peaks far steadier when measured.

Full run (the default models and batch sizes; 27 to 33 minutes on 2 CPU
cores of an Intel Xeon at 2.1 GHz, 11 to 13 of them in the memory
processes), from the repository root:

    python -m tools.benchmark --output=/tmp/benchmark.json

Smoke test (about 100 seconds on the same machine, half of it in the
memory processes):

    python -m tools.benchmark --quick
"""

import gc
import json
import logging as std_logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

from tf_fisher import cli
from tf_fisher import data
from tf_fisher import gram
from tf_fisher import models
from tf_fisher.model import FisherModel
from tf_fisher.run import write_json_atomically

# Input shape of each benchmarked model: the MNIST models take the padded
# 32 x 32 digits of `tf_fisher.data`, ResNet-20 a CIFAR-shaped image.
INPUT_SHAPES = {
    "mlp": (32, 32, 1),
    "resnet8": (32, 32, 1),
    "densenet8": (32, 32, 1),
    "resnet20": (32, 32, 3),
}
NUM_CLASSES = 10
VARIANTS = ("plain", "unprobed", "fast", "whole_model", "loop")

# The environment variable, and its value, under which TensorFlow's CPU
# allocator counts every tensor (see the module docstring). TensorFlow reads
# it once, when it creates the allocator, so it is set for a new process.
COUNT_ALL_TENSORS = ("TF_CPU_ALLOCATOR_USE_BFC", "1")


def counts_all_tensors(environment=os.environ):
    """Return True if `environment` turns on the variable of
    `COUNT_ALL_TENSORS`. TensorFlow reads "1" and "true", in any case, as
    on."""
    return environment.get(COUNT_ALL_TENSORS[0], "").lower() in ("1", "true")


# TensorFlow warnings that the benchmark causes on purpose and that need no
# action: it builds one compiled step per variant from the same
# Keras code, which TensorFlow reports as retracing, and the whole-model
# reference maps convolution gradients, for which `tf.vectorized_map` runs a
# loop.
_EXPECTED_WARNINGS = (
    "triggered tf.function retracing",
    "Conv2DBackpropFilter uses a while_loop",
)


# The folder that contains the `tools` package, from which the tool starts
# itself for the memory pass.
_REPOSITORY_ROOT = os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)


class _DropExpectedWarnings(std_logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        return not any(part in message for part in _EXPECTED_WARNINGS)


LEARNING_RATE = 0.01
# Values of --jit_compile and the `jit_compile` that `compile` gets for each.
JIT_COMPILE = {"auto": "auto", "true": True, "false": False}

FLAGS = flags.FLAGS


def _validate_list(values, allowed, name):
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise flags.ValidationError(
            f"Invalid --{name}={','.join(values)}: expected a comma-separated "
            f"list from {', '.join(allowed)}."
        )
    return True


def _check_batch_sizes(values):
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise flags.ValidationError(
            f"Invalid --batch_sizes={','.join(values)}: expected positive "
            "integers separated by commas, for example 16,32,128."
        )
    return True


def define_flags(flag_values=flags.FLAGS):
    """Define the command-line flags in `flag_values` and return it.

    The flags are defined only when the module runs as a program, so that
    tests can import it next to other programs' flags.
    """
    flags.DEFINE_list(
        "models", ["mlp", "resnet8", "resnet20"],
        f"Models to time, from: {', '.join(INPUT_SHAPES)}.",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "batch_sizes", ["16", "32", "128", "512"],
        "Batch sizes to time, in examples.", flag_values=flag_values,
    )
    flags.DEFINE_list(
        "variants", list(VARIANTS),
        f"Step variants to time, from: {', '.join(VARIANTS)}. `plain` is "
        "always timed, because every ratio is to it, and `unprobed` with "
        "`fast`, because the epoch overhead needs the step after a probe.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "repeats", 10, "Timed steps per variant.", lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "warmup", 2, "Untimed steps per variant before timing; the first "
        "one traces and compiles the step.", lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "memory_repeats", 2, "Steps per variant that measure peak memory, "
        "in a separate process for each model and batch size; 0 skips the "
        "memory measurement.", lower_bound=0, flag_values=flag_values,
    )
    flags.DEFINE_float(
        "memory_timeout_seconds", 1800.0, "Stop the memory process of one "
        "model and batch size after this long, and record no memory for "
        "that cell.", lower_bound=1.0, flag_values=flag_values,
    )
    flags.DEFINE_boolean(
        "memory_only", False, "Measure only the peak memory of one model "
        "at one batch size and write it to --output. The tool starts "
        "itself with this flag, in a process whose allocator counts every "
        f"tensor ({COUNT_ALL_TENSORS[0]}={COUNT_ALL_TENSORS[1]}).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "interval", 50, "Probe interval N for the epoch overhead.",
        lower_bound=1, flag_values=flag_values,
    )
    flags.DEFINE_float(
        "overhead_target", 0.02, "Epoch overhead to report the probe "
        "interval for, as a fraction in (0, 1): the table gives the "
        "smallest N whose overhead is at most this.", flag_values=flag_values,
    )
    flags.DEFINE_float(
        "budget_seconds", 120.0, "Skip a variant at a batch size when its "
        "warm-up and timed steps are estimated, from its step time at the "
        "previous batch size scaled linearly, to take longer than this.",
        lower_bound=0.0, flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output", None, "JSON file for the results, rewritten after each "
        "batch size; none if unset.", flag_values=flag_values,
    )
    flags.DEFINE_boolean(
        "quick", False, "Smoke test: mlp and resnet8 at batch size 16, 3 "
        "repeats, 1 memory step. Overrides --models, --batch_sizes, "
        "--repeats and --memory_repeats.", flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of the network weights.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "block_overlap", gram.DEFAULT_BLOCK_OVERLAP, "`block_overlap` of the "
        "FisherModel variants: how many layers' backward passes a layer's "
        "Gram block may overlap with. 0 uses the least memory.",
        lower_bound=0, flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "jit_compile", "auto", list(JIT_COMPILE), "`jit_compile` of every "
        "model: Keras compiles the steps with XLA for true, and for auto on "
        "a machine with a GPU. FisherModel compiles its probed steps "
        "without XLA either way. Each timed variant records the value "
        "Keras chose.", case_sensitive=False, flag_values=flag_values,
    )
    flags.register_validator(
        "models",
        lambda values: _validate_list(values, INPUT_SHAPES, "models"),
        flag_values=flag_values,
    )
    flags.register_validator(
        "variants",
        lambda values: _validate_list(values, VARIANTS, "variants"),
        flag_values=flag_values,
    )
    flags.register_validator(
        "batch_sizes", _check_batch_sizes, flag_values=flag_values
    )
    flags.register_validator(
        "budget_seconds", math.isfinite, message="must be a finite number",
        flag_values=flag_values,
    )
    # subprocess.run raises ValueError or OverflowError for a timeout of nan
    # or inf, which would end the run after its first timed cell.
    flags.register_validator(
        "memory_timeout_seconds", math.isfinite,
        message="must be a finite number of seconds",
        flag_values=flag_values,
    )
    flags.register_validator(
        "overhead_target", lambda value: 0 < value < 1,
        message="must be a fraction in (0, 1), for example 0.02 for 2%",
        flag_values=flag_values,
    )
    return flag_values


class _ReferenceFisherModel(FisherModel):
    """`FisherModel` whose probe forms the Gram matrix by another route.

    Args:
        network: the network to train.
        gram_function: `(network, loss, x, y) -> [batch, batch]` float64.
        loss: the per-example loss given to `gram_function`.
        **kwargs: passed to `FisherModel`.
    """

    def __init__(self, network, gram_function, loss, **kwargs):
        super().__init__(network, **kwargs)
        self._gram_function = gram_function
        self._probe_loss = loss

    def _gradients_and_gram(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = self.network(x, training=True)
            loss = self._tracked_loss(x, y, y_pred, sample_weight)
        gradients = tape.gradient(loss, self.trainable_variables)
        matrix = self._gram_function(self.network, self._probe_loss, x, y)
        return y_pred, gradients, matrix


def _rows_gram(jacobian):
    """J Jᵀ in float32, returned as float64; J is `[batch, P]`.

    A batch of one matrix product, the fastest form on CPU (see
    `tf_fisher.gram`).
    """
    batched = jacobian[tf.newaxis]
    products = tf.matmul(batched, batched, transpose_b=True)[0]
    return tf.cast(products, tf.float64)


def whole_model_gram(network, loss, x, y):
    """Gram matrix from a whole-model `tf.vectorized_map`, `[batch, batch]`.

    J, `[batch, P]`, is formed in float32 and multiplied in float32.
    """
    jacobian = gram.per_example_gradients(network, loss, x, y)
    return _rows_gram(jacobian)


def loop_gram(network, loss, x, y):
    """Gram matrix from one forward and backward pass per example.

    A compiled `tf.while_loop` writes the gradient of example i into row i
    of J, `[batch, P]`, then J Jᵀ is one float32 matmul.
    """
    weights = network.trainable_weights
    batch = tf.shape(x)[0]

    def body(index, rows):
        with tf.GradientTape() as tape:
            y_pred = network(x[index : index + 1], training=True)
            total = tf.reduce_sum(
                gram.per_example_losses(loss, y[index : index + 1], y_pred)
            )
        row = gram.flat_gradient(tape.gradient(total, weights), weights)
        return index + 1, rows.write(index, row)

    _, rows = tf.while_loop(
        lambda index, _: index < batch,
        body,
        (tf.constant(0), tf.TensorArray(tf.float32, size=batch)),
        parallel_iterations=1,
    )
    return _rows_gram(rows.stack())


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compile(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.SGD(
            LEARNING_RATE, momentum=0.9, nesterov=True
        ),
        loss=_loss(),
        metrics=["accuracy"],
        jit_compile=JIT_COMPILE[jit_compile],
    )
    return model


def build_variant(
    variant, model_name, seed, block_overlap=gram.DEFAULT_BLOCK_OVERLAP,
    jit_compile="auto",
):
    """Build and compile the model that times `variant`. `block_overlap`
    is passed to the `fast` and `unprobed` models, and `jit_compile`, a
    key of `JIT_COMPILE`, to every model's `compile`."""
    network = models.build_model(
        model_name, INPUT_SHAPES[model_name], NUM_CLASSES, seed=seed
    )
    if variant == "plain":
        return _compile(network, jit_compile)
    if variant == "whole_model":
        return _compile(_ReferenceFisherModel(
            network, whole_model_gram, _loss(), fisher_interval=1
        ), jit_compile)
    if variant == "loop":
        return _compile(_ReferenceFisherModel(
            network, loop_gram, _loss(), fisher_interval=1
        ), jit_compile)
    model = _compile(FisherModel(
        network, fisher_interval=1, block_overlap=block_overlap
    ), jit_compile)
    if variant == "unprobed":
        # Probes fall on steps 0, N, 2N, ... of an epoch, and the
        # benchmark never starts an epoch, so with the host counter past 0
        # and a huge N no step takes a probe.
        model.fisher_interval = 2**62
        model._probe.step_in_epoch = 1
    return model


def repeated_batch(x, y):
    """Return an endless iterator over the batch (x, y), shaped as in `fit`.

    The dataset is batched without `drop_remainder`, so the batch size is
    unknown when the step is traced, which is how `fit` compiles the
    training step of a dataset. `train_on_batch` would compile it for the
    one batch size instead.
    """
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    # Cached after batching, so a step does not wait for the batch to be
    # assembled again from single examples, a cost that `fit` hides by
    # prefetching.
    return iter(dataset.batch(int(x.shape[0])).cache().repeat().prefetch(1))


def run_step(variant, model, batches):
    """Run one training step as `fit` does, copy its logs to the host, and
    read the probe values as a callback does.

    Args:
        variant: a name in `VARIANTS`.
        model: the compiled model of `variant`, built by one step.
        batches: an iterator from `repeated_batch`.
    """
    logs = model.train_function(batches)
    tf.nest.map_structure(lambda value: value.numpy(), logs)
    if variant not in ("plain", "unprobed"):
        model.read_probe_values()


def timed_step(variant, model, batches):
    """Return the wall time and the process CPU time of one step, seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    run_step(variant, model, batches)
    return time.perf_counter() - start, time.process_time() - start_cpu


def peak_step_memory_mb(variant, model, batches):
    """Peak tensor memory of one step over the memory held before it, in MiB.

    Read from the statistics of TensorFlow's CPU allocator. Only in a
    process started with `COUNT_ALL_TENSORS` do they count every tensor
    (see the module docstring). Returns None where the allocator keeps no
    statistics.
    """
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    except (ValueError, tf.errors.OpError):
        return None
    run_step(variant, model, batches)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return (peak - before) / 2**20


def batch_of_digits(model_name, batch_size, digits):
    """Return the first `batch_size` training digits and labels as tensors."""
    available = len(digits.train_images)
    if batch_size > available:
        raise ValueError(
            f"Invalid batch size {batch_size}: the digits sample has only "
            f"{available} training images. Use --batch_sizes of at most "
            f"{available}."
        )
    images = digits.train_images[:batch_size].astype(np.float32)
    channels = INPUT_SHAPES[model_name][-1]
    if images.shape[-1] != channels:
        images = np.repeat(images, channels, axis=-1)
    labels = digits.train_labels[:batch_size].astype(np.int32)
    return tf.constant(images), tf.constant(labels)


def time_cell(model_name, batch_size, variants, previous, settings, digits):
    """Time every variant at one batch size, interleaved round robin.

    Args:
        model_name: a key of `INPUT_SHAPES`.
        batch_size: examples per step.
        variants: variant names to time.
        previous: dict variant -> (batch size, median seconds) of the last
            batch size timed; updated in place.
        settings: dict with repeats, warmup, memory_repeats (for the
            budget estimate), budget_seconds and seed.
        digits: the `tf_fisher.data.DatasetSplits` of the digits.

    Returns:
        Dict variant -> result dict (median_ms, times_ms, median_cpu_ms),
        or {"skipped": reason}. `_add_memory` adds the peak memory.
    """
    x, y = batch_of_digits(model_name, batch_size, digits)
    results, runners = {}, {}
    for variant in variants:
        reason = _over_budget(previous, variant, batch_size, settings)
        if reason is not None:
            results[variant] = {"skipped": reason}
            logging.info(
                "%s B=%d %s skipped: %s", model_name, batch_size, variant,
                reason,
            )
            continue
        runners[variant] = build_variant(
            variant, model_name, settings["seed"], **_model_settings(settings)
        )

    batches = repeated_batch(x, y)
    _warm_up(runners, x, y, batches, settings["warmup"])
    times, cpu_times = _time_rounds(
        runners, batches, settings["repeats"], settings["seed"]
    )
    for name in times:
        median = statistics.median(times[name])
        # `after_probe` reuses the `unprobed` model, so it has no model or
        # budget estimate of its own.
        if name in runners:
            previous[name] = (batch_size, median)
        model = runners.get(name, runners.get("unprobed"))
        results[name] = {
            "median_ms": 1e3 * median,
            "times_ms": [1e3 * t for t in times[name]],
            "median_cpu_ms": 1e3 * statistics.median(cpu_times[name]),
            # True when Keras compiled the model's unprobed steps with XLA.
            "jit_compile": bool(model.jit_compile),
        }
    if "fast" in runners:
        results["eigenvalues"] = time_eigenvalues(
            runners["fast"].network, x, y, settings["repeats"]
        )
    del runners
    keras.backend.clear_session()
    gc.collect()
    return results


def time_eigenvalues(network, x, y, repeats):
    """Time the eigenvalues of the batch's Gram matrix alone, two ways.

    The probe needs every eigenvalue of the float64 B x B matrix, to find
    the smallest nonzero one. This times `tf.linalg.eigvalsh` compiled in
    a `tf.function`, as the probed step runs it, and LAPACK's `syevd`
    driver through SciPy, the fastest symmetric eigenvalue driver that
    SciPy offers, on the Gram matrix of `x` and `y` for `network`. Both
    solvers run their tridiagonal reduction on one thread, so the time
    they take is a floor for any probe that computes the eigenvalues
    exactly inside the step.

    Returns:
        Dict with the median wall times in ms (`tensorflow_ms`,
        `lapack_ms`) of `repeats` calls each, interleaved, and
        `largest_difference`, the largest difference between the two
        spectra over the largest eigenvalue.
    """
    matrix = gram.gram_matrix(network, _loss(), x, y)
    compiled_eigvalsh = tf.function(tf.linalg.eigvalsh)
    host_matrix = matrix.numpy()

    def lapack_eigenvalues():
        return scipy.linalg.eigh(
            host_matrix, eigvals_only=True, driver="evd", check_finite=False
        )

    # The first calls trace the function and load LAPACK; untimed.
    from_tensorflow = compiled_eigvalsh(matrix).numpy()
    from_lapack = lapack_eigenvalues()
    times = {"tensorflow": [], "lapack": []}
    for _ in range(repeats):
        start = time.perf_counter()
        compiled_eigvalsh(matrix).numpy()
        times["tensorflow"].append(time.perf_counter() - start)
        start = time.perf_counter()
        lapack_eigenvalues()
        times["lapack"].append(time.perf_counter() - start)
    scale = max(float(np.max(np.abs(from_lapack))), np.finfo(float).tiny)
    return {
        "tensorflow_ms": 1e3 * statistics.median(times["tensorflow"]),
        "lapack_ms": 1e3 * statistics.median(times["lapack"]),
        "largest_difference": float(
            np.max(np.abs(from_tensorflow - from_lapack)) / scale
        ),
    }


def _model_settings(settings):
    """Return the run's `block_overlap` and `jit_compile` as keyword
    arguments of `build_variant`, with the defaults for settings that leave
    them out, such as those the tests build."""
    return {
        "block_overlap": settings.get(
            "block_overlap", gram.DEFAULT_BLOCK_OVERLAP
        ),
        "jit_compile": settings.get("jit_compile", "auto"),
    }


def _warm_up(runners, x, y, batches, steps):
    """Build each model and its optimizer, as `fit` does before its first
    step, then run `steps` untimed steps, the first of which traces."""
    for variant, model in runners.items():
        model.train_on_batch(x, y)
        for _ in range(steps):
            run_step(variant, model, batches)


def measure_memory(model_name, batch_size, variants, settings, digits):
    """Return dict variant -> peak memory of a step in MiB, or None.

    Each value is the largest of `settings["memory_repeats"]` steps, taken
    after one untimed step. The values count every tensor only in a process
    started with `COUNT_ALL_TENSORS`; `memory_in_new_process` starts one.
    """
    x, y = batch_of_digits(model_name, batch_size, digits)
    runners = {
        variant: build_variant(
            variant, model_name, settings["seed"], **_model_settings(settings)
        )
        for variant in variants
    }
    batches = repeated_batch(x, y)
    _warm_up(runners, x, y, batches, 1)
    peaks = {}
    for variant, model in runners.items():
        values = [
            peak_step_memory_mb(variant, model, batches)
            for _ in range(settings["memory_repeats"])
        ]
        values = [value for value in values if value is not None]
        peaks[variant] = max(values) if values else None
    return peaks


def memory_in_new_process(model_name, batch_size, variants, settings):
    """Run `measure_memory` in a new process that counts every tensor.

    Returns:
        Dict variant -> peak MiB or None. Empty, with a warning, when the
        process fails (the warning quotes its error output) or times out
        after `settings["memory_timeout_seconds"]`, when it is stopped.
    """
    variable, value = COUNT_ALL_TENSORS
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "memory.json")
        command = [
            sys.executable, "-m", "tools.benchmark", "--memory_only",
            f"--models={model_name}", f"--batch_sizes={batch_size}",
            f"--variants={','.join(variants)}",
            f"--memory_repeats={settings['memory_repeats']}",
            f"--seed={settings['seed']}",
            *(
                f"--{name}={value}"
                for name, value in _model_settings(settings).items()
            ),
            f"--output={output}",
        ]
        timeout = settings["memory_timeout_seconds"]
        try:
            completed = subprocess.run(
                command, check=False,
                env=dict(os.environ, **{variable: value}),
                cwd=_REPOSITORY_ROOT, capture_output=True, text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            logging.warning(
                "The memory of %s at batch size %d was not measured: %s "
                "timed out after %.0f s and was stopped. Raise "
                "--memory_timeout_seconds, or pass --memory_repeats=0 to "
                "skip the memory pass.", model_name, batch_size,
                " ".join(command), timeout,
            )
            return {}
        if completed.returncode != 0:
            logging.warning(
                "The memory of %s at batch size %d was not measured: %s "
                "exited with status %d:\n%s", model_name, batch_size,
                " ".join(command), completed.returncode,
                completed.stderr[-2000:],
            )
            return {}
        with open(output) as results:
            return json.load(results)


def _over_budget(previous, variant, batch_size, settings):
    """Return why `variant` is skipped at `batch_size`, or None to run it.

    The step time at the previous batch size, scaled linearly, estimates
    the warm-up, timed and memory steps. `plain` always runs.
    """
    if variant == "plain" or variant not in previous:
        return None
    steps = (
        settings["warmup"] + settings["repeats"] + settings["memory_repeats"]
    )
    previous_batch, previous_seconds = previous[variant]
    estimate = previous_seconds * batch_size / previous_batch * steps
    if estimate <= settings["budget_seconds"]:
        return None
    return (
        f"estimated {estimate:.0f} s for {steps} steps, over the budget of "
        f"{settings['budget_seconds']:.0f} s (--budget_seconds)"
    )


def _time_rounds(runners, batches, repeats, seed):
    """Return dicts name -> wall times and name -> CPU times, in seconds.

    Each round runs every variant once, in an order shuffled anew for each
    round, so that no variant always follows the same one. When both `fast`
    and `unprobed` run, the `unprobed` model also takes one step right after
    each `fast` step, timed under the name `after_probe`. In training, the
    step after a probe is an ordinary step, and anything the probe leaves
    behind, such as a BLAS thread that keeps spinning, slows it down.
    """
    names = list(runners)
    if "fast" in runners and "unprobed" in runners:
        names.append("after_probe")
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}

    def record(name, variant):
        wall, cpu = timed_step(variant, runners[variant], batches)
        times[name].append(wall)
        cpu_times[name].append(cpu)

    shuffler = random.Random(seed)
    for _ in range(repeats):
        order = list(runners)
        shuffler.shuffle(order)
        for variant in order:
            record(variant, variant)
            if variant == "fast" and "after_probe" in times:
                record("after_probe", "unprobed")
    return times, cpu_times


def summarise_cell(results, interval, overhead_target=0.02):
    """Add ratios to `plain`, the loop speed-up, the epoch overhead at
    `interval`, and the smallest interval whose overhead is at most
    `overhead_target`. The eigenvalue times of `time_eigenvalues`, under
    the key "eigenvalues" of `results` when present, move to the summary
    with their own overhead at `interval`: the fastest of them over
    `interval` plain steps."""
    results = dict(results)
    eigenvalues = results.pop("eigenvalues", None)
    plain = results["plain"]["median_ms"]
    plain_cpu = results["plain"]["median_cpu_ms"]
    for result in results.values():
        if "median_ms" in result:
            result["ratio_to_plain"] = result["median_ms"] / plain
            result["cpu_ratio_to_plain"] = result["median_cpu_ms"] / plain_cpu
    summary = {"variants": results}
    fast = results.get("fast", {}).get("median_ms")
    loop = results.get("loop", {}).get("median_ms")
    if fast is not None and loop is not None:
        summary["loop_over_fast"] = loop / fast
    if fast is not None:
        # What one probe adds to an epoch: its own step over a plain one,
        # plus any slow-down of the step after it.
        probe_cost = fast - plain
        after_probe = results.get("after_probe", {}).get("median_ms")
        unprobed = results.get("unprobed", {}).get("median_ms")
        if after_probe is not None and unprobed is not None:
            summary["after_probe_extra_ms"] = after_probe - unprobed
            probe_cost += after_probe - unprobed
        summary["probe_cost_ms"] = probe_cost
        summary["epoch_overhead"] = probe_cost / (interval * plain)
        summary["interval_for_target"] = max(
            1, math.ceil(probe_cost / (overhead_target * plain))
        )
    if eigenvalues is not None:
        fastest = min(eigenvalues["tensorflow_ms"], eigenvalues["lapack_ms"])
        summary["eigenvalues"] = dict(
            eigenvalues, epoch_overhead=fastest / (interval * plain)
        )
    return summary


def cpu_model():
    """Return the CPU model name from /proc/cpuinfo, or the platform's."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description():
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "load_average_before": list(os.getloadavg()),
    }


def _time_column(variants, variant, with_ratio=True):
    result = variants.get(variant)
    if result is None:
        return "-"
    if "median_ms" not in result:
        return "skipped"
    if not with_ratio:
        return f"{result['median_ms']:.1f}"
    return f"{result['median_ms']:.1f} ({result['ratio_to_plain']:.2f}x)"


def _memory_column(variants, variant):
    value = variants.get(variant, {}).get("peak_memory_mb")
    return "-" if value is None else f"{value:.1f}"


def _table_row(cell):
    variants = cell["variants"]
    speedup = cell.get("loop_over_fast")
    overhead = cell.get("epoch_overhead")
    target_interval = cell.get("interval_for_target")
    memory = " / ".join(
        _memory_column(variants, v) for v in VARIANTS if v != "unprobed"
    )
    columns = [
        cell["model"],
        str(cell["batch_size"]),
        _time_column(variants, "plain", with_ratio=False),
        _time_column(variants, "unprobed"),
        _time_column(variants, "fast"),
        _time_column(variants, "after_probe"),
        _time_column(variants, "whole_model"),
        _time_column(variants, "loop"),
        "-" if speedup is None else f"{speedup:.1f}",
        "-" if overhead is None else f"{100 * overhead:.2f}%",
        "-" if target_interval is None else str(target_interval),
        memory,
    ]
    return "| " + " | ".join(columns) + " |"


def format_table(report):
    """Return the results as a Markdown table."""
    interval = report["settings"]["interval"]
    target = report["settings"]["overhead_target"]
    header = (
        "| model | batch | plain ms | unprobed ms | fast ms "
        "| step after a probe ms | whole-model ms "
        f"| loop ms | loop / fast | epoch overhead at N={interval} "
        f"| N for overhead ≤ {100 * target:g}% "
        "| peak MiB plain / fast / whole-model / loop |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    lines.extend(_table_row(cell) for cell in report["results"])
    return "\n".join(lines)


def format_eigenvalue_table(report):
    """Return the eigenvalue times as a Markdown table, or "" when no cell
    has them."""
    cells = [cell for cell in report["results"] if "eigenvalues" in cell]
    if not cells:
        return ""
    interval = report["settings"]["interval"]
    header = (
        "| model | batch | plain ms | probe cost ms | eigvalsh ms "
        "| LAPACK syevd ms | fastest eigenvalues alone at "
        f"N={interval} | probe at N={interval} |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for cell in cells:
        eigenvalues = cell["eigenvalues"]
        probe_cost = cell.get("probe_cost_ms")
        overhead = cell.get("epoch_overhead")
        columns = [
            cell["model"],
            str(cell["batch_size"]),
            _time_column(cell["variants"], "plain", with_ratio=False),
            "-" if probe_cost is None else f"{probe_cost:.1f}",
            f"{eigenvalues['tensorflow_ms']:.1f}",
            f"{eigenvalues['lapack_ms']:.1f}",
            f"{100 * eigenvalues['epoch_overhead']:.2f}%",
            "-" if overhead is None else f"{100 * overhead:.2f}%",
        ]
        lines.append("| " + " | ".join(columns) + " |")
    return "\n".join(lines)


def check_output_path(path):
    """Create the folder of the JSON file `path`, or raise ValueError naming
    --output when `path` cannot be written as a file.

    The temporary file that `write_json_atomically` writes first is created
    and removed here, so that a folder without write permission fails
    before any timing, not after the first batch size.
    """
    if os.path.isdir(path):
        raise ValueError(
            f"Invalid --output={path}: it is a folder. Pass a file name, "
            f"for example {os.path.join(path, 'benchmark.json')}."
        )
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise ValueError(
            f"Invalid --output={path}: a part of its folder path is a file "
            f"({error.filename}). Pass a file in a folder."
        ) from error
    except OSError as error:
        raise ValueError(
            f"Invalid --output={path}: cannot create its folder "
            f"({error.strerror}). Pass a file in a writable folder."
        ) from error
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w"):
            pass
        os.remove(temporary)
    except OSError as error:
        raise ValueError(
            f"Invalid --output={path}: cannot write {temporary} "
            f"({error.strerror}), which the results are written to before "
            "they replace the file. Pass a file in a writable folder."
        ) from error


def _variants_to_time(requested):
    """Return `requested` in `VARIANTS` order, with `plain`, and with
    `unprobed` when `fast` is timed."""
    selected = set(requested) | {"plain"}
    if "fast" in selected:
        selected.add("unprobed")
    return [variant for variant in VARIANTS if variant in selected]


def settings_from_flags(flag_values=FLAGS):
    """Return the run's settings from parsed flags, models and batch sizes
    without repeats, batch sizes sorted."""
    settings = {
        "models": list(dict.fromkeys(flag_values.models)),
        "batch_sizes": sorted({int(b) for b in flag_values.batch_sizes}),
        "variants": _variants_to_time(flag_values.variants),
        "repeats": flag_values.repeats,
        "warmup": flag_values.warmup,
        "memory_repeats": flag_values.memory_repeats,
        "interval": flag_values.interval,
        "overhead_target": flag_values.overhead_target,
        "budget_seconds": flag_values.budget_seconds,
        "memory_timeout_seconds": flag_values.memory_timeout_seconds,
        "seed": flag_values.seed,
        "block_overlap": flag_values.block_overlap,
        "jit_compile": flag_values.jit_compile,
    }
    if flag_values.quick:
        settings.update(
            models=["mlp", "resnet8"], batch_sizes=[16], repeats=3,
            memory_repeats=1,
        )
    return settings


def _add_memory(results, model_name, batch_size, settings):
    """Set `peak_memory_mb` of each timed variant in `results`, measured in
    a new process."""
    timed = [
        variant for variant in VARIANTS
        if "median_ms" in results.get(variant, {})
    ]
    logging.info(
        "Measuring the memory of %s at batch size %d in a new process",
        model_name, batch_size,
    )
    peaks = memory_in_new_process(model_name, batch_size, timed, settings)
    for variant in timed:
        results[variant]["peak_memory_mb"] = peaks.get(variant)


def _memory_only(settings, digits):
    """Write `measure_memory` of the one model and batch size to --output;
    return the exit status."""
    variable, value = COUNT_ALL_TENSORS
    problem = None
    if not counts_all_tensors():
        problem = (
            f"--memory_only needs {variable}={value} in the environment "
            "when TensorFlow starts, or the allocator leaves out small "
            "tensors. Run the tool without --memory_only: it starts "
            "itself with both for each model and batch size."
        )
    elif len(settings["models"]) != 1 or len(settings["batch_sizes"]) != 1:
        problem = (
            "--memory_only measures one model at one batch size; got "
            f"--models={','.join(settings['models'])} and --batch_sizes="
            f"{','.join(map(str, settings['batch_sizes']))}."
        )
    elif not FLAGS.output or not settings["memory_repeats"]:
        problem = "--memory_only needs --output and --memory_repeats > 0."
    if problem is not None:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    # The variants asked for, without the ones `--variants` adds for timing.
    variants = [variant for variant in VARIANTS if variant in FLAGS.variants]
    peaks = measure_memory(
        settings["models"][0], settings["batch_sizes"][0], variants,
        settings, digits,
    )
    write_json_atomically(FLAGS.output, peaks)
    return 0


def main(argv):
    if not cli.check_arguments(argv, 0, "python -m tools.benchmark [flags]"):
        return 2
    settings = settings_from_flags()
    std_logging.getLogger("tensorflow").addFilter(_DropExpectedWarnings())
    report = {
        "command": " ".join(["python -m tools.benchmark"] + sys.argv[1:]),
        "machine": machine_description(),
        "settings": settings,
        "results": [],
    }
    digits = data.load_dataset("mnist5k")
    try:
        if FLAGS.output:
            check_output_path(FLAGS.output)
        # Fails before any timing when a batch size exceeds the digits.
        batch_of_digits(
            settings["models"][0], max(settings["batch_sizes"]), digits
        )
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    if FLAGS.memory_only:
        return _memory_only(settings, digits)
    variable, _ = COUNT_ALL_TENSORS
    if counts_all_tensors():
        print(
            f"Error: {variable}={os.environ[variable]} is set, so the timed "
            "steps would run with the BFC allocator instead of the default "
            "one that training uses. Unset it: the tool sets it itself for "
            "the memory processes.",
            file=sys.stderr,
        )
        return 2
    for model_name in settings["models"]:
        previous = {}
        for batch_size in settings["batch_sizes"]:
            logging.info("Timing %s at batch size %d", model_name, batch_size)
            results = time_cell(
                model_name, batch_size, settings["variants"], previous,
                settings, digits,
            )
            if settings["memory_repeats"]:
                _add_memory(results, model_name, batch_size, settings)
            cell = {"model": model_name, "batch_size": batch_size}
            cell.update(summarise_cell(
                results, settings["interval"], settings["overhead_target"]
            ))
            report["results"].append(cell)
            if FLAGS.output:
                write_json_atomically(FLAGS.output, report)
    report["machine"]["load_average_after"] = list(os.getloadavg())
    if FLAGS.output:
        write_json_atomically(FLAGS.output, report)
    print(json.dumps(report, indent=2))
    print(format_table(report))
    eigenvalue_table = format_eigenvalue_table(report)
    if eigenvalue_table:
        print()
        print(eigenvalue_table)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
