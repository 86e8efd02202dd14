"""One training run: data, model, recipe, measures, and the run folder.

A run folder holds:

* `config.json`: the configuration, with the augmentation that "auto"
  chose and the folder the data came from, written before training.
* `samples.csv`: one row per probed iteration (see
  `tf_fisher.callbacks.SAMPLE_COLUMNS`), flushed as it comes.
* `fisher_state.json`: the running measures and the number of rows after
  each epoch, which `tf_fisher.FisherCallback` reads to continue an
  interrupted run.
* `epochs.csv`: one row per epoch (`EPOCH_COLUMNS`), flushed as it comes.
* `tensorboard/`: event files; `train/` and `validation/` from Keras'
  TensorBoard callback, `fisher/` with the measures, and in the folder
  itself the hyperparameters for TensorBoard's HParams dashboard
  (`write_hparams`) and, at the end, the run's status (`write_status`).
* `summary.json`: written atomically at the end, with `status` "completed"
  or "diverged".
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import time

import keras
import tensorflow as tf
from absl import logging
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api as hparams_api
from tensorboard.plugins.hparams import api_pb2 as hparams_api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import (
    plugin_data_pb2 as hparams_plugin_data_pb2,
)
from tensorboard.plugins.hparams import summary as hparams_summary

from tf_fisher import callbacks as fisher_callbacks
from tf_fisher import data
from tf_fisher import gradient_statistics
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher import model as model_lib
from tf_fisher import models
from tf_fisher import schedules
from tf_fisher.model import FisherModel

# Largest valid seed. Keras' `set_random_seed` seeds NumPy, which accepts
# only seeds from 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1

EPOCH_COLUMNS = (
    "epoch",
    "stage",
    "batch_size",
    "learning_rate",
    "loss",
    "train_error",
    "test_loss",
    "test_error",
    "mean_condition_number",
    "cumulative_fisher_energy",
    "num_iterations",
    "num_samples",
    "epoch_seconds",
    "elapsed_seconds",
) + gradient_statistics.GRADIENT_KEYS


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run.

    Attributes:
        dataset: one of `tf_fisher.data.DATASET_NAMES`.
        model: one of `tf_fisher.models.MODEL_NAMES`.
        epochs: total number of epochs.
        learning_rate: initial learning rate, dropped ×0.1 at 50% and 75%.
        batch_sizes: batch size of each stage; stages split the epochs (see
            `stages`). One entry trains with a fixed batch size.
        schedule: the batch-size schedule's name, for records only.
        seed: seed of weights, shuffling and augmentation.
        fisher_interval: probe steps 1, 1 + N, ... of each epoch.
        eigenvalue_tolerance: relative tolerance for nonzero eigenvalues.
        momentum: Nesterov momentum.
        weight_decay: L2 coefficient, kept out of J.
        augment: training augmentation, one of
            `tf_fisher.data.AUGMENTATIONS`: "auto" (the dataset's default:
            flips and crops for CIFAR, none for the others), "none", "crop"
            or "flip_crop".
        gram_method: "fast" or "tape".
        block_overlap: `FisherModel`'s `block_overlap`; it changes the
            memory and speed of probed steps, not their measures.
        data_dir: TensorFlow Datasets folder, or None for its default.
        output_dir: the run folder.
        stage_epochs: explicit epoch ranges, `[[first, end], ...]` 0-based,
            one per batch size; None splits the epochs evenly.
        verbose: Keras progress bar mode passed to `fit`.
    """

    dataset: str = "mnist5k"
    model: str = "mlp"
    epochs: int = 10
    learning_rate: float = 0.05
    batch_sizes: tuple = (32,)
    schedule: str = ""
    seed: int = 0
    fisher_interval: int = 50
    eigenvalue_tolerance: float = measures.DEFAULT_TOLERANCE
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "auto"
    gram_method: str = "fast"
    block_overlap: int = gram.DEFAULT_BLOCK_OVERLAP
    data_dir: str = None
    output_dir: str = "runs/run"
    stage_epochs: list = None
    verbose: int = 0

    def stages(self):
        """Return the batch-size stages of this run."""
        if self.stage_epochs is not None:
            return schedules.stages_from_ranges(
                self.batch_sizes, self.stage_epochs, self.epochs
            )
        return schedules.even_stages(self.batch_sizes, self.epochs)


def write_json_atomically(path, content):
    """Write `content` as JSON to `path` through a temporary file and rename,
    so readers never see a partial file. NaN and infinite floats (the
    measures of a diverged run) are written as null, to keep the file
    standard JSON."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(
                _finite_or_none(content), file, indent=2, sort_keys=True,
                default=_to_json, allow_nan=False,
            )
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # A full disk or an interrupt leaves no partial temporary file.
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def is_write_failure(error, output_dir):
    """Return True if `error` is a failed write, such as a full disk: an
    OSError, or a TensorFlow error that names a file under `output_dir`,
    as TensorFlow's event writers raise."""
    if isinstance(error, OSError):
        return True
    return isinstance(error, tf.errors.OpError) and (
        os.path.normpath(output_dir) in str(error)
    )


# The file in an output folder that a running sweep, study or run keeps
# locked.
LOCK_FILE = "folder.lock"


@contextlib.contextmanager
def folder_lock(output_dir, resumable=True):
    """Hold the lock of `output_dir`, which must exist, while the block runs.

    Two sweeps, or two runs, that write into the same folder would delete
    and rewrite each other's records. The lock is an `fcntl.flock` on
    `LOCK_FILE`, which the system releases when the process ends, however
    it ends.

    Args:
        output_dir: the folder.
        resumable: whether the command that takes the lock goes on where
            an earlier one stopped (a sweep), for the error message.

    Raises:
        ValueError: naming the folder, if another process holds its lock.
    """
    path = os.path.join(output_dir, LOCK_FILE)
    if resumable:
        advice = (
            "Wait for it to end, or stop it and run this command again to "
            "go on where it stopped"
        )
    else:
        advice = "Wait for it to end, or stop it"
    with open(path, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"Another process is training into {output_dir} (it holds "
                f"{path}). {advice}; use another --output_dir to train both "
                "at once."
            ) from None
        yield


def _finite_or_none(value):
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _to_json(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Cannot write {type(value).__name__} as JSON")


# Files and folders that a run writes; `prepare_run_folder` looks for them.
RUN_FILES = (
    "config.json",
    "samples.csv",
    fisher_callbacks.STATE_FILE,
    "epochs.csv",
    "decisions.csv",
    "summary.json",
    "tensorboard",
)


# Everything a run may leave in its folder: `RUN_FILES` and the temporary
# files of its atomic writes, which an interrupt can leave behind. A sweep
# deletes an unfinished run folder only if it contains nothing else.
RUN_ENTRIES = frozenset(RUN_FILES) | {LOCK_FILE} | {
    f"{name}.tmp"
    for name in ("config.json", "summary.json", fisher_callbacks.STATE_FILE)
}


def check_folder_path(path, flag="output_dir"):
    """Check, without creating anything, that `path` is a folder or can be
    created as one.

    Raises:
        ValueError: naming `--{flag}`, if `path` is a file, a part of it is
            a file, or its nearest existing folder is not writable.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Invalid --{flag}={path}: it is a file, not a folder. Pass the "
            "path of a folder."
        )
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"Invalid --{flag}={path}: {existing} is a file, so the folder "
            "cannot be created. Pass a path whose parts are folders."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"Invalid --{flag}={path}: the folder {existing} is not "
            "writable. Pass a folder that you can write to."
        )


def check_run_folder(output_dir, overwrite=False):
    """Check that `output_dir` can take a new run, without changing it.

    Args:
        output_dir: the run folder; it need not exist.
        overwrite: whether the records of an earlier run may be replaced.

    Returns:
        The names in `RUN_FILES` of the earlier run's records found there.

    Raises:
        ValueError: if `output_dir` cannot be a folder (see
            `check_folder_path`), or contains an earlier run's records and
            `overwrite` is False.
    """
    check_folder_path(output_dir)
    existing = [
        name for name in RUN_FILES
        if os.path.exists(os.path.join(output_dir, name))
    ]
    if existing and not overwrite:
        raise ValueError(
            f"--output_dir={output_dir} already contains a run "
            f"({', '.join(existing)}). Pass --overwrite to replace it, or "
            "choose another --output_dir."
        )
    return existing


def prepare_run_folder(output_dir, overwrite=False):
    """Check `output_dir` as `check_run_folder` does, then delete the
    records of an earlier run found there."""
    for name in check_run_folder(output_dir, overwrite):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def read_summary(output_dir):
    """Return the run's summary dict, or None if the run has not finished.

    Raises:
        ValueError: naming the file, if summary.json is not a JSON object.
    """
    path = os.path.join(output_dir, "summary.json")
    if not os.path.exists(path):
        return None
    fix = (
        "The run writes it whole, so it was changed after the run. Restore "
        "it, or delete the run folder to train the run again."
    )
    with open(path) as file:
        try:
            summary = json.load(file)
        except ValueError as error:
            raise ValueError(
                f"Invalid {path}: it is not valid JSON ({error}). {fix}"
            ) from None
    if not isinstance(summary, dict):
        # A ValueError like the one above: the file's content is invalid.
        raise ValueError(  # noqa: TRY004
            f"Invalid {path}: expected a JSON object, found "
            f"{type(summary).__name__}. {fix}"
        )
    return summary


class EpochRecorder(keras.callbacks.Callback):
    """Writes one `epochs.csv` row and one log line per epoch.

    Place it after `FisherCallback`, which adds the measures to the logs.
    """

    def __init__(self, output_dir, num_epochs, running):
        super().__init__()
        self._csv = fisher_callbacks.AppendingCSV(
            os.path.join(output_dir, "epochs.csv"), EPOCH_COLUMNS
        )
        self.num_epochs = num_epochs
        self.running = running
        self.rows = []
        self.stage = 0
        self.batch_size = None
        self.start_time = time.time()
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = _epoch_row(epoch, logs)
        row.update(
            stage=self.stage,
            batch_size=self.batch_size,
            learning_rate=fisher_callbacks.current_learning_rate(
                self.model.optimizer
            ),
            num_iterations=self.running.num_iterations,
            num_samples=self.running.num_samples,
            epoch_seconds=time.time() - self._epoch_start,
            elapsed_seconds=time.time() - self.start_time,
        )
        self.rows.append(row)
        self._csv.write(row)
        logging.info(
            "epoch %d/%d  batch %d  lr %.4g  loss %.4f  train error %.2f%%  "
            "test error %.2f%%  C_K %.4g  L_K %.4g  B_simple %.4g  "
            "norm test %.3g  %.1f s",
            epoch + 1, self.num_epochs, self.batch_size,
            row["learning_rate"], row["loss"], 100 * row["train_error"],
            100 * row["test_error"], row["mean_condition_number"],
            row["cumulative_fisher_energy"], row["noise_scale"],
            row["norm_test_ratio"], row["epoch_seconds"],
        )

    def on_train_end(self, logs=None):
        self._csv.close()


def _epoch_row(epoch, logs):
    def value(key):
        return float(logs[key]) if key in logs else math.nan

    row = {
        "epoch": epoch + 1,
        "loss": value("loss"),
        "train_error": 1.0 - value("accuracy"),
        "test_loss": value("val_loss"),
        "test_error": 1.0 - value("val_accuracy"),
        "mean_condition_number": value("mean_condition_number"),
        "cumulative_fisher_energy": value("cumulative_fisher_energy"),
    }
    row.update(
        (key, value(key)) for key in gradient_statistics.GRADIENT_KEYS
    )
    return row


def build_fisher_model(config, splits, model_class=FisherModel):
    """Build and compile the `FisherModel` of a run (SGD, Nesterov).

    `model_class` is called with `FisherModel`'s arguments to create the
    model. It may be a subclass of `FisherModel` or a function returning one.
    """
    keras.utils.set_random_seed(config.seed)
    network = models.build_model(
        config.model, splits.input_shape, splits.num_classes, seed=config.seed
    )
    model = model_class(
        network,
        fisher_interval=config.fisher_interval,
        eigenvalue_tolerance=config.eigenvalue_tolerance,
        weight_decay=config.weight_decay,
        gram_method=config.gram_method,
        block_overlap=config.block_overlap,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=config.learning_rate,
            # Keras' SGD takes only a float momentum.
            momentum=float(config.momentum),
            nesterov=config.momentum > 0,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# The metrics of TensorBoard's HParams dashboard: (tag, folder of the event
# files under `tensorboard/`, name shown).
HPARAMS_METRICS = (
    ("epoch_mean_condition_number", "fisher", "C̄_K"),
    ("epoch_cumulative_fisher_energy", "fisher", "L_K"),
    ("epoch_accuracy", "validation", "test accuracy"),
    ("epoch_loss", "validation", "test loss"),
    ("epoch_accuracy", "train", "train accuracy"),
    ("epoch_loss", "train", "train loss"),
)


def config_record(config, splits):
    """Return the content of config.json: the fields of `config`, the
    augmentation that "auto" chose for `splits` (`augmentation`) and where
    their examples were read from (`data_source`)."""
    return dict(
        dataclasses.asdict(config),
        augmentation=data.augmentation_name(splits),
        data_source=splits.source,
    )


def run_hparams(config, schedule=None, augmentation=None):
    """Return the hyperparameters of a run, as TensorBoard records them.

    Args:
        config: the `RunConfig`.
        schedule: the batch-size schedule's name. None takes
            `config.schedule`, or when that is empty the stage batch sizes
            as "s32" or "s32-s64".
        augmentation: the augmentation that "auto" chose (see
            `tf_fisher.data.augmentation_name`); None takes
            `config.augment`.
    """
    if schedule is None:
        schedule = config.schedule or "-".join(
            f"s{size}" for size in config.batch_sizes
        )
    return {
        "dataset": config.dataset,
        "model": config.model,
        "schedule": schedule,
        "batch_size": int(config.batch_sizes[0]),
        "learning_rate": float(config.learning_rate),
        "epochs": int(config.epochs),
        "seed": int(config.seed),
        "fisher_interval": int(config.fisher_interval),
        "eigenvalue_tolerance": float(config.eigenvalue_tolerance),
        "momentum": float(config.momentum),
        "weight_decay": float(config.weight_decay),
        "augment": augmentation or config.augment,
    }


def write_hparams(config, schedule=None, augmentation=None):
    """Record the run's hyperparameters in `tensorboard/` of its folder.

    TensorBoard's HParams dashboard then lists every run under its
    `--logdir`, a sweep's for example, in one table with its batch size,
    learning rate and the last values of the `HPARAMS_METRICS`, and plots
    them against each other. `batch_size` is the first stage's batch size,
    and `schedule` names the sequence of sizes (see `run_hparams`).
    """
    values = run_hparams(config, schedule, augmentation)
    writer = tf.summary.create_file_writer(
        os.path.join(config.output_dir, "tensorboard")
    )
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            _hparams_experiment(values).SerializeToString(), step=0
        )
        hparams_api.hparams(values)
    writer.close()


def write_status(output_dir, status):
    """Record how the run ended in `tensorboard/` of its folder.

    The HParams dashboard then shows a "completed" run as a success and a
    "diverged" one as a failure. A run that is still training, or that was
    killed, has no status there (STATUS_UNKNOWN). TensorBoard keeps the
    first status it reads for a run, so this is written once, at the end.
    """
    code = (
        hparams_api_pb2.STATUS_SUCCESS if status == "completed"
        else hparams_api_pb2.STATUS_FAILURE
    )
    writer = tf.summary.create_file_writer(
        os.path.join(output_dir, "tensorboard")
    )
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(
            hparams_summary.session_end_pb(code).SerializeToString(), step=0
        )
    writer.close()


def _hparams_experiment(values):
    """Return the `Summary` that declares the HParams experiment.

    It declares the `HPARAMS_METRICS`, so that the dashboard does not list
    every scalar of the run as a metric, and the type of each value.
    `hparams_api.hparams_config` sets a type only from a domain of values,
    which one run of a sweep does not know.
    """
    experiment = hparams_api_pb2.Experiment(
        hparam_infos=[
            hparams_api_pb2.HParamInfo(
                name=name,
                type=hparams_api_pb2.DATA_TYPE_STRING
                if isinstance(value, str)
                else hparams_api_pb2.DATA_TYPE_FLOAT64,
            )
            for name, value in values.items()
        ],
        metric_infos=[
            hparams_api_pb2.MetricInfo(
                name=hparams_api_pb2.MetricName(group=group, tag=tag),
                display_name=name,
            )
            for tag, group, name in HPARAMS_METRICS
        ],
        time_created_secs=time.time(),
    )
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=hparams_metadata.EXPERIMENT_TAG,
        metadata=hparams_metadata.create_summary_metadata(
            hparams_plugin_data_pb2.HParamsPluginData(experiment=experiment)
        ),
        tensor=hparams_metadata.NULL_TENSOR,
    )
    return summary


def check_batch_sizes(batch_sizes, num_train):
    """Raise ValueError unless every batch size is in [1, num_train]."""
    for size in batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"Invalid batch size {size!r}: expected a positive integer."
            )
        if size > num_train:
            raise ValueError(
                f"Invalid batch size {size}: the training set has only "
                f"{num_train} examples. Set --batch_size (or each "
                f"--batch_sizes entry) to at most {num_train}."
            )


def check_options(config):
    """Raise ValueError, naming the field and its value, unless the model
    and optimizer accept the measure and optimizer fields of `config`.

    The fields are `fisher_interval`, `eigenvalue_tolerance`,
    `weight_decay`, `gram_method` and `block_overlap`, checked as
    `FisherModel` checks them,
    `momentum`, a number in [0, 1] as Keras' SGD requires, `seed`, an
    integer in [0, `MAX_SEED`] as NumPy's seeding requires, and `augment`,
    one of `tf_fisher.data.AUGMENTATIONS`.
    """
    model_lib.check_arguments(
        config.fisher_interval,
        config.eigenvalue_tolerance,
        config.weight_decay,
        config.gram_method,
        config.block_overlap,
    )
    momentum = config.momentum
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, int | float)
        or not 0 <= momentum <= 1
    ):
        raise ValueError(
            "Invalid momentum: expected a number in [0, 1]. "
            f"Received: momentum={momentum!r}"
        )
    seed = config.seed
    if (
        isinstance(seed, bool)
        or not isinstance(seed, int)
        or not 0 <= seed <= MAX_SEED
    ):
        raise ValueError(
            f"Invalid seed: expected an integer from 0 to {MAX_SEED}. "
            f"Received: seed={seed!r}"
        )
    data.check_augmentation(config.augment)


def check_run(config, num_train):
    """Raise ValueError unless the model and optimizer accept `config`
    (see `check_options`) and every stage's batch size fits the
    `num_train` training examples."""
    check_options(config)
    check_batch_sizes(
        [stage.batch_size for stage in config.stages()], num_train
    )


def train(config, splits=None, model_class=FisherModel):
    """Train one run and write its folder. Return the summary dict.

    Args:
        config: the `RunConfig`.
        splits: the `tf_fisher.data.DatasetSplits` to train on. None loads
            `config.dataset`.
        model_class: `FisherModel`, a subclass, or a function with its
            arguments that returns one; see `build_fisher_model`.

    Raises:
        ValueError: for an invalid configuration (before anything is written).
        tf_fisher.data.DatasetNotFoundError: when the dataset is not prepared.
    """
    stages = config.stages()
    if splits is None:
        splits = data.load_dataset(config.dataset, config.data_dir)
    check_run(config, splits.num_train)
    splits = data.with_augmentation(splits, config.augment)
    os.makedirs(config.output_dir, exist_ok=True)
    write_json_atomically(
        os.path.join(config.output_dir, "config.json"),
        config_record(config, splits),
    )
    logging.info(
        "Training %s on %s (%d train, %d test examples) for %d epoch%s "
        "into %s",
        config.model, config.dataset, splits.num_train,
        len(splits.test_labels), config.epochs,
        "" if config.epochs == 1 else "s", config.output_dir,
    )
    model = build_fisher_model(config, splits, model_class)
    write_hparams(config, augmentation=data.augmentation_name(splits))
    summary = _fit_stages(model, config, splits, stages)
    # A sweep skips a run whose folder has summary.json, so the status is
    # written first: a run stopped between the two writes is rerun.
    write_status(config.output_dir, summary["status"])
    write_json_atomically(
        os.path.join(config.output_dir, "summary.json"), summary
    )
    logging.info(
        "Run %s: %s in %.1f s, test error %.2f%%, C_K %.4g, L_K %.4g",
        config.output_dir, summary["status"], summary["wall_seconds"],
        100 * summary["final"]["test_error"],
        summary["final"]["mean_condition_number"],
        summary["final"]["cumulative_fisher_energy"],
    )
    return summary


def make_recorders(config):
    """Create the callbacks that write a run's records into its folder.

    Returns:
        `(fisher, recorder, tensorboard)`: the `FisherCallback`, the
        `EpochRecorder` that shares its running measures, and Keras'
        TensorBoard callback. Place `tensorboard` before `fisher`, and
        `fisher` before `recorder`, which reads the measures it adds.
    """
    tensorboard_dir = os.path.join(config.output_dir, "tensorboard")
    # The run logs a divergence itself, naming its folder.
    fisher = fisher_callbacks.FisherCallback(
        config.output_dir, os.path.join(tensorboard_dir, "fisher"),
        verbose=False,
    )
    recorder = EpochRecorder(config.output_dir, config.epochs, fisher.running)
    tensorboard = keras.callbacks.TensorBoard(
        tensorboard_dir, write_graph=False
    )
    return fisher, recorder, tensorboard


def _fit_stages(model, config, splits, stages):
    fisher, recorder, tensorboard = make_recorders(config)
    test_data = data.eval_pipeline(
        splits.test_images, splits.test_labels, batch_size=500
    )
    callbacks = [
        schedules.StepDecay(config.learning_rate, config.epochs),
        schedules.StageLogs(stages),
        tensorboard,
        fisher,
        recorder,
    ]
    stage_records = []
    for index, stage in enumerate(stages):
        recorder.stage = index
        recorder.batch_size = stage.batch_size
        start = time.time()
        # Each stage rebuilds the pipeline for its batch size. The model
        # keeps its compiled train function (traced with a batch dimension
        # of None, so no retrace), its optimizer state and its step count.
        # The offset gives each stage its own sequence of epoch orders.
        train_data = data.train_pipeline(
            splits,
            stage.batch_size,
            config.seed,
            epoch_seed_offset=stage.first_epoch,
        )
        model.fit(
            train_data,
            shuffle=False,
            validation_data=test_data,
            initial_epoch=stage.first_epoch,
            epochs=stage.end_epoch,
            callbacks=callbacks,
            verbose=config.verbose,
        )
        stage_records.append(
            {
                "batch_size": stage.batch_size,
                "first_epoch": stage.first_epoch + 1,
                # Lower than the planned end when training diverged.
                "last_epoch": len(recorder.rows),
                "wall_seconds": time.time() - start,
            }
        )
        if fisher.diverged_at is not None:
            logging.error(
                "Run %s diverged: %s. Its records so far are kept.",
                config.output_dir, fisher.diverged_at,
            )
            break
    return run_summary(config, recorder, fisher, stage_records)


def run_summary(config, recorder, fisher, stage_records):
    """Return the summary dict of a finished or diverged run."""
    final = recorder.rows[-1] if recorder.rows else {}
    return {
        "status": "diverged" if fisher.diverged_at else "completed",
        "diverged_at": fisher.diverged_at,
        "config": dataclasses.asdict(config),
        "schedule": config.schedule,
        "stages": stage_records,
        "epochs_completed": len(recorder.rows),
        "wall_seconds": time.time() - recorder.start_time,
        "final": {key: final.get(key, math.nan) for key in EPOCH_COLUMNS},
        "measures": fisher.running.state(),
    }
