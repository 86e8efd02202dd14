"""Keras callbacks that record the Fisher measures of a `FisherModel`."""

import csv
import json
import math
import os
import warnings

import keras
import tensorflow as tf

from tf_fisher import gradient_statistics
from tf_fisher import measures

# Per-sample CSV columns, in order.
SAMPLE_COLUMNS = (
    ("step", "epoch", "learning_rate")
    + measures.PROBE_KEYS
    + (
        "fisher_energy",
        "mean_condition_number",
        "cumulative_fisher_energy",
    )
)

# The file in which `FisherCallback` keeps what it needs to continue a run.
STATE_FILE = "fisher_state.json"

# Keys that `FisherCallback` adds to the logs of every epoch: the running
# measures, then the epoch averages of the gradient statistics.
EPOCH_KEYS = (
    "mean_condition_number",
    "cumulative_fisher_energy",
) + gradient_statistics.GRADIENT_KEYS


def current_learning_rate(optimizer):
    """Return the learning rate that `optimizer` applies next, as a float.

    `optimizer.learning_rate` is a variable, or a tensor when a schedule
    sets it. NumPy 2 warns when `keras.ops.convert_to_numpy` reads the
    variable, because its `__array__` takes no `copy` argument, so the
    value is read through `tf.convert_to_tensor`.
    """
    return float(tf.convert_to_tensor(optimizer.learning_rate))


class AppendingCSV:
    """A CSV file that gets one row at a time and is flushed after each.

    The first `open` or write of an instance replaces any existing file, so
    rerunning a script never mixes old rows with new ones. Later writes
    append, also after `close`, so one instance can serve several `fit`
    calls.

    Args:
        path: file to write.
        columns: column names, in order.
    """

    def __init__(self, path, columns):
        self.path = path
        self.columns = tuple(columns)
        self._file = None
        self._writer = None
        self._started = False

    def write(self, row):
        """Append `row` (a dict; missing columns are left empty), flush."""
        self.open()
        self._writer.writerow({key: row.get(key, "") for key in self.columns})
        self._file.flush()

    def open(self, kept_rows=()):
        """Open the file if it is closed: the first time it replaces any
        file there with the header and `kept_rows` (dicts, as
        `csv.DictReader` reads them), later it appends."""
        if self._file is not None:
            return
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        mode = "a" if self._started else "w"
        # Kept open across rows; closed by close().
        self._file = open(self.path, mode, newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        if not self._started:
            self._writer.writeheader()
            self._writer.writerows(kept_rows)
            self._file.flush()
            self._started = True

    def check_writable(self):
        """Raise OSError now if the file could not be opened for writing,
        without changing it."""
        if not self._started:
            with open(self.path, "a"):
                pass

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


# Integer columns of `samples.csv`; the others are floats.
_INTEGER_COLUMNS = frozenset({"step", "epoch", "batch_size", "rank"})


class _CannotContinue(Exception):
    """The reason that the records of an earlier run cannot be continued."""


def _parsed_row(row, where="a row of samples.csv"):
    """Return a `samples.csv` row read back as the dict the callback made.

    Raises:
        ValueError: naming `where` and the column, for a value that is not
            a number.
    """
    parsed = {}
    for key, text in row.items():
        try:
            value = float(text) if text not in ("", None) else math.nan
        except (TypeError, ValueError):
            raise ValueError(
                f"{where} has {text!r} in column {key!r}, not a number"
            ) from None
        if key in _INTEGER_COLUMNS and math.isfinite(value):
            value = int(value)
        parsed[key] = value
    return parsed


def _make_folder(path, argument):
    """Create the folder `path` of the argument named `argument`, or raise
    an error that names both."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"FisherCallback needs a folder path for {argument}, a str or "
            f"os.PathLike. Received: {argument}={path!r}."
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"FisherCallback writes into a folder, but {argument}={path!r} "
            "is a file. Pass a folder; it is created if missing."
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OSError(
            error.errno,
            f"FisherCallback cannot create {argument}={path!r}: "
            f"{error.strerror}. Pass a folder it can write.",
        ) from error


class FisherCallback(keras.callbacks.Callback):
    """Records the Fisher measures of a `tf_fisher.FisherModel`.

    After each probed step it reads the probe's measures from the model,
    computes l_k = (α_k / B_k) · sqrt(Tr F) with the learning rate in force
    at that step (read before the step, because a `LearningRateSchedule`
    moves on with each update), and updates the running C̄_K and L_K
    (`tf_fisher.measures.RunningMeasures`).
    Each sample becomes a CSV row, written and flushed as it comes, and
    TensorBoard scalars `batch_*` at the global step. At each epoch end it
    adds `mean_condition_number` (C̄_K), `cumulative_fisher_energy` (L_K)
    and the epoch averages of the gradient statistics
    (`tf_fisher.gradient_statistics.epoch_statistics`) to the epoch logs, so
    `History` and later callbacks see them, and writes them as `epoch_*`
    TensorBoard scalars. List it before the callbacks that read those keys,
    such as `EarlyStopping(monitor="mean_condition_number", mode="min")`
    (Keras cannot tell which way these keys improve) or `CSVLogger`.

    One instance may serve several `fit` calls (for example the stages of a
    batch-size schedule): the measures keep accumulating across them. A new
    instance starts them again, and replaces the `samples.csv` of its
    folder, unless it continues an interrupted run (below). Pass
    each later call the `initial_epoch` where the previous one stopped, as
    `keras.callbacks.TensorBoard` also needs: Keras numbers the epochs of a
    call from `initial_epoch`, and the CSV's epoch column and the `epoch_*`
    scalars take those numbers.

    Args:
        output_dir: folder for `samples.csv`; None writes no CSV.
        tensorboard_dir: folder for the TensorBoard event files; None writes
            none.
        stop_on_divergence: stop training when a probed Gram trace or the
            epoch loss is NaN or infinite.
        verbose: print a line when it stops training, saying why, and when
            it continues an interrupted run.

    Raises:
        TypeError: if `output_dir` or `tensorboard_dir` is not a path.
        ValueError: if either is a file.
        OSError: naming the folder, if it cannot be created.

    Attributes:
        running: the `RunningMeasures` of the run.
        samples: list of per-sample dicts, keyed by `SAMPLE_COLUMNS`.
        diverged_at: None, or a message saying where training diverged.

    With an `output_dir`, the callback also writes `STATE_FILE` there at
    each epoch end: for every epoch so far, the running measures and the
    number of rows after it. When a new instance's first epoch is not the
    first of training, because `fit` was given `initial_epoch` or
    `keras.callbacks.BackupAndRestore` resumed an interrupted run, the
    callback continues the run recorded there: it keeps the rows written
    before that epoch, drops the later ones, and restores C̄_K and L_K.
    When the files cannot give them, it warns, keeps the earlier rows in
    `samples.csv.bak` and starts again. The TensorBoard event files keep
    the `batch_*` points that the dropped rows had, so TensorBoard shows
    two values at those steps.
    """

    def __init__(
        self, output_dir=None, tensorboard_dir=None, stop_on_divergence=True,
        verbose=True,
    ):
        super().__init__()
        self.running = measures.RunningMeasures()
        self.samples = []
        self.diverged_at = None
        self.stop_on_divergence = stop_on_divergence
        self.verbose = verbose
        self._csv = None
        self._state_path = None
        if output_dir is not None:
            _make_folder(output_dir, "output_dir")
            self._csv = AppendingCSV(
                os.path.join(output_dir, "samples.csv"), SAMPLE_COLUMNS
            )
            self._state_path = os.path.join(output_dir, STATE_FILE)
        self._begun = False
        # One entry per completed epoch, written to `STATE_FILE`.
        self._state_entries = []
        self._writer = None
        if tensorboard_dir is not None:
            _make_folder(tensorboard_dir, "tensorboard_dir")
            self._writer = tf.summary.create_file_writer(tensorboard_dir)
        self._epoch = 0
        self._epoch_first_sample = 0
        self._learning_rate = math.nan

    def set_model(self, model):
        if not hasattr(model, "probe_values"):
            raise ValueError(
                "FisherCallback needs a tf_fisher.FisherModel, which computes "
                f"the measures. Received: a {type(model).__name__}. Wrap the "
                "network with tf_fisher.FisherModel(network)."
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        # Checked before the first step, so that a file that cannot be
        # written stops `fit` before it trains. The first epoch decides
        # whether the file is replaced or continued.
        if self._csv is not None:
            self._csv.check_writable()

    def on_epoch_begin(self, epoch, logs=None):
        if not self._begun:
            self._begin(epoch)
        self._epoch = epoch
        self._epoch_first_sample = len(self.samples)

    def _begin(self, epoch):
        """Start the records at the instance's first epoch, continuing the
        run recorded in `STATE_FILE` when `epoch` is not the first."""
        self._begun = True
        if epoch == 0:
            if self._csv is not None:
                self._csv.open()
            return

        if self._csv is None:
            warnings.warn(
                f"FisherCallback starts C̄_K and L_K again at epoch "
                f"{epoch + 1}: without an output_dir it has no record of "
                "the earlier epochs. Pass output_dir to continue an "
                "interrupted run.",
                stacklevel=3,
            )
            return
        if not (
            os.path.exists(self._csv.path)
            or os.path.exists(self._state_path)
        ):
            # Nothing to continue: a run that starts late on purpose.
            self._csv.open()
            return

        try:
            entries, rows, samples = self._records_before(epoch)
        except _CannotContinue as reason:
            self._start_again(epoch, reason)
            return
        self.running.restore(entries[-1]["running"])
        self._state_entries = entries
        self.samples = samples
        self._csv.open(rows)
        if self.verbose:
            print(
                f"FisherCallback continues the run in {self._csv.path} "
                f"after epoch {epoch}: {len(rows)} samples, C̄_K "
                f"{self.running.mean_condition_number:.4g}, L_K "
                f"{self.running.cumulative_energy:.4g}."
            )

    def _records_before(self, epoch):
        """Return the state entries of epochs 1 to `epoch`, and the CSV rows
        written by then both as read and as `samples` dicts.

        Raises:
            _CannotContinue: saying why, if the files cannot give them.
        """
        state_path, csv_path = self._state_path, self._csv.path
        try:
            with open(state_path) as file:
                entries = json.load(file)["epochs"]
            entries = [entry for entry in entries if entry["epoch"] <= epoch]
            for entry in entries:
                measures.RunningMeasures().restore(entry["running"])
                int(entry["samples"])
        except FileNotFoundError:
            raise _CannotContinue(f"{state_path} is missing") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _CannotContinue(
                f"{state_path} cannot be read ({type(error).__name__}: "
                f"{error})"
            ) from None
        if not entries or entries[-1]["epoch"] != epoch:
            last = entries[-1]["epoch"] if entries else 0
            raise _CannotContinue(
                f"{state_path} records the epochs up to {last}, so it cannot "
                f"give the measures after epoch {epoch}"
            )
        count = int(entries[-1]["samples"])
        try:
            with open(csv_path, newline="") as file:
                rows = list(csv.DictReader(file))[:count]
            samples = [
                _parsed_row(row, f"row {index + 1} of {csv_path}")
                for index, row in enumerate(rows)
            ]
        except FileNotFoundError:
            raise _CannotContinue(f"{csv_path} is missing") from None
        except (OSError, ValueError) as error:
            raise _CannotContinue(str(error)) from None
        if len(rows) < count:
            raise _CannotContinue(
                f"{csv_path} contains {len(rows)} rows, but {state_path} "
                f"records {count} after epoch {epoch}"
            )
        return entries, rows, samples

    def _start_again(self, epoch, reason):
        """Warn that the records cannot be continued, keep the earlier rows
        beside the new file, and start the measures again."""
        backup_note = ""
        if os.path.exists(self._csv.path):
            backup = self._csv.path + ".bak"
            os.replace(self._csv.path, backup)
            backup_note = f" The earlier rows are kept in {backup}."
        warnings.warn(
            f"FisherCallback cannot continue the run recorded in "
            f"{os.path.dirname(self._csv.path) or '.'} at epoch {epoch + 1}: "
            f"{reason}. It starts C̄_K and L_K again.{backup_note} To "
            "continue a run, resume it at the epoch after one that it "
            f"completed, with {STATE_FILE} and samples.csv as it left them.",
            stacklevel=4,
        )
        self._csv.open()

    def _save_state(self, epoch):
        """Add the measures after `epoch` to `STATE_FILE`, replacing those
        of any later epoch that an earlier run recorded."""
        # Imported here because `tf_fisher.run` imports this module.
        from tf_fisher import run

        self._state_entries = [
            entry for entry in self._state_entries if entry["epoch"] <= epoch
        ]
        self._state_entries.append({
            "epoch": epoch + 1,
            "samples": len(self.samples),
            "running": self.running.state(),
        })
        run.write_json_atomically(
            self._state_path, {"epochs": self._state_entries}
        )

    def on_train_batch_begin(self, batch, logs=None):
        # The rate of this step: after the step, a learning-rate schedule
        # already gives the next step's rate.
        if measures.is_probe_step(batch, self.model.fisher_interval):
            self._learning_rate = current_learning_rate(self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        self.running.add_iterations(1)
        if not measures.is_probe_step(batch, self.model.fisher_interval):
            return
        row = self._read_probe()
        self.samples.append(row)
        if self._csv is not None:
            self._csv.write(row)
        self._write_scalars("batch_", row, row["step"])
        if not math.isfinite(row["trace"]):
            self._diverge(
                f"the Gram trace is {row['trace']} at step {row['step']} "
                f"(epoch {self._epoch + 1})"
            )

    def _read_probe(self):
        values = self.model.read_probe_values()
        learning_rate = self._learning_rate
        energy = measures.fisher_energy(
            learning_rate, values["batch_size"], values["trace"]
        )
        if not math.isfinite(values["trace"]):
            energy = math.nan
        self.running.add_sample(values["condition_number"], energy)
        row = dict(values)
        row.update(
            step=self.running.num_iterations,
            epoch=self._epoch + 1,
            learning_rate=learning_rate,
            batch_size=int(values["batch_size"]),
            rank=int(values["rank"]),
            fisher_energy=energy,
            mean_condition_number=self.running.mean_condition_number,
            cumulative_fisher_energy=self.running.cumulative_energy,
        )
        return row

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        epoch_values = {
            "mean_condition_number": self.running.mean_condition_number,
            "cumulative_fisher_energy": self.running.cumulative_energy,
        }
        epoch_values.update(
            gradient_statistics.epoch_statistics(
                self.samples[self._epoch_first_sample :]
            )
        )
        logs.update(epoch_values)
        self._write_scalars("epoch_", epoch_values, epoch)
        if self._state_path is not None:
            self._save_state(epoch)
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._diverge(f"the training loss is {loss} in epoch {epoch + 1}")

    def _diverge(self, reason):
        first = self.diverged_at is None
        if first:
            self.diverged_at = reason
        if self.stop_on_divergence:
            self.model.stop_training = True
            if first and self.verbose:
                print(
                    f"FisherCallback stopped training: {reason}. Lower the "
                    "learning rate, or pass stop_on_divergence=False to "
                    "train on."
                )

    def _write_scalars(self, prefix, values, step):
        if self._writer is None:
            return
        with self._writer.as_default(step=int(step)):
            for key, value in values.items():
                if key in ("step", "epoch"):
                    continue
                tf.summary.scalar(prefix + key, float(value))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._csv is not None:
            self._csv.close()
        if self._writer is not None:
            self._writer.flush()
