"""Tests for experiments.study and experiments.sweep: grids, run folders,
resuming, divergence, and one real sweep of two one-epoch MLP runs."""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags

from experiments import study as study_lib
from experiments import sweep
from tf_fisher import cli
from tf_fisher import run
from tf_fisher import schedules


def read_json(path):
    with open(path) as file:
        return json.load(file)


def small_grid(**changes):
    fields = {
        "dataset": "mnist5k",
        "model": "mlp",
        "epochs": 20,
        "batch_sizes": (32, 128),
        "learning_rates": (0.05, 0.2),
        "seeds": (0, 1),
    }
    fields.update(changes)
    return study_lib.Grid(**fields)


def small_study(*grids):
    return study_lib.Study(name="small", grids=grids or (small_grid(),))


def test_expand_orders_by_seed_then_grid():
    specs = study_lib.expand(small_study(), "/out")
    names = [spec.name for spec in specs]
    assert names == [
        "mnist5k_mlp_e20/s32_lr0.05_seed0",
        "mnist5k_mlp_e20/s128_lr0.05_seed0",
        "mnist5k_mlp_e20/s32_lr0.2_seed0",
        "mnist5k_mlp_e20/s128_lr0.2_seed0",
        "mnist5k_mlp_e20/s32_lr0.05_seed1",
        "mnist5k_mlp_e20/s128_lr0.05_seed1",
        "mnist5k_mlp_e20/s32_lr0.2_seed1",
        "mnist5k_mlp_e20/s128_lr0.2_seed1",
    ]
    config = specs[2].config
    assert config.output_dir == "/out/mnist5k_mlp_e20/s32_lr0.2_seed0"
    assert config.batch_sizes == (32,)
    assert config.learning_rate == 0.2
    assert config.schedule == "s32"
    assert config.stage_epochs is None


def test_expand_adds_schedules_and_missing_beacons():
    grid = small_grid(
        seeds=(0,), schedules=("s32-to-128", "s32-to-128-MS"),
        schedule_learning_rate=0.1,
    )
    specs = {spec.name: spec for spec in study_lib.expand(
        small_study(grid), "/out"
    )}
    # 2 x 2 grid runs, 2 beacons at lr 0.1, 2 schedules.
    assert len(specs) == 8
    assert "mnist5k_mlp_e20/s32_lr0.1_seed0" in specs
    assert "mnist5k_mlp_e20/s128_lr0.1_seed0" in specs
    multi = specs["mnist5k_mlp_e20/s32-to-128-MS_lr0.1_seed0"].config
    stages = schedules.parse_schedule("s32-to-128-MS", 20)
    assert multi.batch_sizes == tuple(stage.batch_size for stage in stages)
    assert multi.stage_epochs == [
        [stage.first_epoch, stage.end_epoch] for stage in stages
    ]
    assert multi.learning_rate == 0.1
    # The config trains the stages that the schedule names.
    assert multi.stages() == stages


def test_expand_keeps_beacons_in_grid_once():
    grid = small_grid(seeds=(0,), schedules=("s32-to-128",),
                      schedule_learning_rate=0.05)
    names = [spec.name for spec in study_lib.expand(small_study(grid), "o")]
    assert len(names) == len(set(names)) == 5


def test_grid_options_reach_run_config():
    grid = small_grid(options={"fisher_interval": 7, "momentum": 0.5})
    config = study_lib.expand(small_study(grid), "o")[0].config
    assert config.fisher_interval == 7
    assert config.momentum == 0.5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "imagenet"}, "Invalid dataset 'imagenet'"),
        ({"model": "vgg"}, "Invalid model 'vgg'"),
        ({"epochs": 0}, "Invalid epochs"),
        ({"batch_sizes": (32, 0)}, "Invalid batch_sizes"),
        ({"batch_sizes": ()}, "Invalid batch_sizes"),
        ({"learning_rates": (0.1, -1.0)}, "Invalid learning_rates"),
        ({"seeds": (0, 0)}, "Repeated seed"),
        ({"seeds": ()}, "Invalid seeds"),
        ({"seeds": (0, -1)}, r"Invalid seeds \(0, -1\).*from 0 to 4294967295"),
        ({"seeds": (2**32,)}, "Invalid seeds"),
        ({"seeds": 0}, r"Invalid seeds.*such as \(0,\)"),
        ({"batch_sizes": 32}, "Invalid batch_sizes.*expected a tuple"),
        ({"schedules": "s32-to-512"}, "Invalid schedules.*expected a tuple"),
        ({"schedules": ("s32-to-100",)}, "grid 'mnist5k_mlp_e20'"),
        ({"epochs": 10, "schedules": ("s32-to-512-MS",)}, "at least 20"),
        ({"options": {"momentun": 0.9}}, "Unknown option 'momentun'"),
        ({"options": {"seed": 3}}, "the grid sets it"),
        (
            {"options": {"fisher_interval": 0}},
            (
                r"In grid 'mnist5k_mlp_e20': Invalid fisher_interval: "
                r"expected a positive integer. Received: fisher_interval=0"
            ),
        ),
        (
            {"options": {"gram_method": "slow"}},
            (
                r"In grid 'mnist5k_mlp_e20': Invalid gram_method: expected "
                r"'fast' or 'tape'. Received: gram_method='slow'"
            ),
        ),
        (
            {"options": {"block_overlap": -1}},
            r"In grid .*Received: block_overlap=-1",
        ),
        (
            {"options": {"eigenvalue_tolerance": 1.5}},
            r"In grid .*Received: eigenvalue_tolerance=1.5",
        ),
        (
            {"options": {"weight_decay": -1e-4}},
            r"In grid .*Received: weight_decay=-0.0001",
        ),
        (
            {"options": {"momentum": 1.5}},
            r"In grid .*Received: momentum=1.5",
        ),
        (
            {"options": {"augment": "flip"}},
            r"In grid .*Received: augment='flip'",
        ),
    ],
)
def test_check_study_rejects(changes, message):
    with pytest.raises(ValueError, match=message):
        study_lib.check_study(small_study(small_grid(**changes)))


def test_config_without_newer_field_counts_default():
    """A run recorded before a RunConfig field existed trained as the
    field's default does, so a resumed sweep keeps it and reruns it only
    when the grid sets another value."""
    config = run.RunConfig(output_dir="runs/a")
    recorded = json.loads(json.dumps(dataclasses.asdict(config)))
    del recorded["augment"]
    assert sweep.config_differences(recorded, config) == []
    cropped = dataclasses.replace(config, augment="crop")
    assert sweep.config_differences(recorded, cropped) == [
        "augment: 'auto' != 'crop'"
    ]


def test_check_study_rejects_duplicate_folders():
    with pytest.raises(ValueError, match="distinct"):
        study_lib.check_study(small_study(small_grid(), small_grid()))


def test_load_study_from_name_and_file(tmp_path):
    assert study_lib.load_study("smoke").name == "smoke"
    assert study_lib.load_study("experiments.configs.smoke").name == "smoke"
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="mine", grids=(Grid(
                dataset="mnist5k", model="mlp", epochs=1,
                batch_sizes=(8,), learning_rates=(0.1,)),))
    """))
    assert study_lib.load_study(str(path)).name == "mine"


def test_load_study_errors(tmp_path):
    with pytest.raises(ValueError, match="not found.*mnist5k_cpu"):
        study_lib.load_study("no_such_study")
    with pytest.raises(ValueError, match="not found"):
        study_lib.load_study(str(tmp_path / "missing.py"))
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(TypeError, match="get_study"):
        study_lib.load_study(str(path))


def test_every_shipped_config_is_valid():
    """Each shipped study expands to one run per seed and per fixed
    configuration, beacon and schedule of each grid, each in its own
    folder, and every run's stages can be built."""
    for name in study_lib.available_configs():
        study = study_lib.load_study(name)
        specs = study_lib.expand(study, "o")
        folders = [spec.config.output_dir for spec in specs]
        assert len(set(folders)) == len(specs), name
        for grid in study.grids:
            fixed = {
                (size, rate)
                for size in grid.batch_sizes
                for rate in grid.learning_rates
            }
            if grid.schedules:
                beacon_sizes = grid.beacon_batch_sizes or grid.batch_sizes
                fixed |= {
                    (size, grid.schedule_learning_rate)
                    for size in beacon_sizes
                }
            expected = len(grid.seeds) * (len(fixed) + len(grid.schedules))
            in_grid = [spec for spec in specs if spec.grid == grid.folder]
            assert len(in_grid) == expected, (name, grid.folder)
            for spec in in_grid:
                assert spec.config.dataset == grid.dataset
                assert spec.config.model == grid.model
                assert spec.config.epochs == grid.epochs
                assert spec.config.stages(), spec.name


def test_select_grids():
    study = small_study(small_grid(), small_grid(model="resnet8"))
    chosen = sweep.select_grids(study, ["mnist5k_resnet8_e20"])
    assert [grid.model for grid in chosen.grids] == ["resnet8"]
    with pytest.raises(ValueError, match="Unknown grid 'x'.*mnist5k_mlp"):
        sweep.select_grids(study, ["x"])


def test_with_data_dir_replaces_option():
    study = sweep.with_data_dir(small_study(), "/data")
    assert study.grids[0].options == {"data_dir": "/data"}
    spec = study_lib.expand(study, "o")[0]
    assert spec.config.data_dir == "/data"


def test_clear_run_folder(tmp_path):
    folder = tmp_path / "run"
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "epochs.csv").write_text("epoch\n1\n")
    (folder / run.LOCK_FILE).write_text("")
    sweep.clear_run_folder(str(folder))
    # The lock file stays, for the worker that holds it.
    assert os.listdir(folder) == [run.LOCK_FILE]
    os.remove(folder / run.LOCK_FILE)
    sweep.clear_run_folder(str(folder))
    assert os.listdir(folder) == []
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        sweep.clear_run_folder(str(folder))
    assert (folder / "notes.txt").exists()


def test_interrupted_run_folder_is_cleared(tmp_path, digits):
    """A real run's folder without its summary.json, as an interrupt after
    the first epoch leaves it, holds only files that the sweep and the
    adaptive study know, so both clear it to train the run again."""
    from experiments import adaptive_study

    folder = tmp_path / "run"
    config = run.RunConfig(
        epochs=1, batch_sizes=(512,), fisher_interval=4,
        output_dir=str(folder),
    )
    run.train(config, splits=digits)
    os.remove(folder / "summary.json")
    names = set(os.listdir(folder))
    assert {"samples.csv", "epochs.csv", "fisher_state.json"} <= names
    adaptive_study.clear_unfinished(str(folder))
    assert not folder.exists()
    run.train(config, splits=digits)
    os.remove(folder / "summary.json")
    (folder / "train.log").write_text("log of the sweep's worker\n")
    sweep.clear_run_folder(str(folder))
    assert os.listdir(folder) == []


def test_worker_fails_on_locked_run_folder(tmp_path):
    """A worker whose run folder another run is training into fails that
    run and deletes none of the other run's files."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "samples.csv").write_text("step\n1\n")
    config = run.RunConfig(epochs=1, batch_sizes=(512,), output_dir=str(folder))
    with run.folder_lock(str(folder), resumable=False):
        outcome = sweep.train_in_worker(config)
    assert outcome["status"] == "failed"
    assert "Another process is training into" in outcome["message"]
    assert (folder / "samples.csv").read_text() == "step\n1\n"


def test_finished_summary_rejects_other_config(tmp_path):
    spec = study_lib.expand(small_study(), str(tmp_path))[0]
    os.makedirs(spec.config.output_dir)
    assert sweep.finished_summary(spec) is None
    recorded = dataclasses.asdict(spec.config)
    summary = {"status": "completed", "config": recorded, "final": {}}
    path = os.path.join(spec.config.output_dir, "summary.json")
    run.write_json_atomically(path, summary)
    assert sweep.finished_summary(spec) == read_json(path)
    # The overlap of the probe with backprop changes no result, and runs
    # recorded before it was a field lack it.
    del recorded["block_overlap"]
    run.write_json_atomically(path, summary)
    assert sweep.finished_summary(spec) == read_json(path)
    recorded["epochs"] = 3
    run.write_json_atomically(path, summary)
    with pytest.raises(ValueError, match="epochs: 3 != 20"):
        sweep.finished_summary(spec)


def test_format_duration():
    assert sweep.format_duration(42.4) == "42 s"
    assert sweep.format_duration(185) == "3 min 05 s"
    assert sweep.format_duration(3720) == "1 h 02 min"


def test_run_sweep_rejects_bad_jobs(tmp_path):
    with pytest.raises(ValueError, match="jobs=0"):
        sweep.run_sweep(small_study(), str(tmp_path), jobs=0)


def parse_flags(*args):
    """Return the sweep's flags, defined apart from the global ones and
    parsed from `args`."""
    values = sweep.define_flags(flags.FlagValues())
    values(["sweep", *args])
    return values


def test_main_dry_run_lists_runs(tmp_path, capsys):
    values = parse_flags("--dry_run", f"--output_dir={tmp_path}")
    assert sweep.main(["sweep", "smoke"], values) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mnist5k_mlp_e1/s128_lr0.05_seed0\tto train"
    assert lines[-1] == f"4 runs in {tmp_path}"
    assert not os.path.exists(tmp_path / "sweep.json")


def test_main_rejects_folder_in_use(tmp_path, capsys):
    """While another process holds the output folder's lock, a sweep on
    that folder exits with status 2 and leaves the run folders alone: it
    would otherwise delete the unfinished ones that are being written."""
    folder = tmp_path / "mnist5k_mlp_e1" / "s128_lr0.05_seed0"
    folder.mkdir(parents=True)
    (folder / "epochs.csv").write_text("epoch\n0\n")
    values = parse_flags(f"--output_dir={tmp_path}")
    with open(tmp_path / run.LOCK_FILE, "a") as lock:
        # A lock on another open file counts as another process's.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep.main(["sweep", "smoke"], values) == 2
    error = capsys.readouterr().err
    assert f"Another process is training into {tmp_path}" in error
    assert (folder / "epochs.csv").read_text() == "epoch\n0\n"
    assert not (tmp_path / "sweep.json").exists()


def test_dry_run_warns_about_folder_in_use(tmp_path, capsys):
    values = parse_flags("--dry_run", f"--output_dir={tmp_path}")
    assert sweep.main(["sweep", "smoke"], values) == 0
    assert "Warning" not in capsys.readouterr().err
    with open(tmp_path / run.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep.main(["sweep", "smoke"], values) == 0
    captured = capsys.readouterr()
    assert f"another process is training into {tmp_path}" in captured.err
    assert "4 runs in" in captured.out


def test_dry_run_rejects_foreign_file(tmp_path, capsys):
    """The dry run stops on a run folder with a file that a run does not
    write, as the sweep would, and keeps the file."""
    folder = tmp_path / "mnist5k_mlp_e1" / "s128_lr0.05_seed0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    values = parse_flags("--dry_run", f"--output_dir={tmp_path}")
    assert sweep.main(["sweep", "smoke"], values) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


def test_main_rejects_output_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("keep me")
    values = parse_flags(f"--output_dir={path}")
    assert sweep.main(["sweep", "smoke"], values) == 2
    assert "is a file" in capsys.readouterr().err
    assert path.read_text() == "keep me"


def test_main_dry_run_rejects_output_file(tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("keep me")
    values = parse_flags("--dry_run", f"--output_dir={path}")
    assert sweep.main(["sweep", "smoke"], values) == 2
    assert "is a file" in capsys.readouterr().err
    assert path.read_text() == "keep me"


def test_main_rejects_config_without_study(tmp_path, capsys):
    """A configuration whose get_study is missing or returns no Study is
    invalid input: status 2 and one line, not a traceback."""
    missing = tmp_path / "missing.py"
    missing.write_text("X = 1\n")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_study():\n    return 5\n")
    values = parse_flags(f"--output_dir={tmp_path / 'out'}")
    assert sweep.main(["sweep", str(missing)], values) == 2
    assert "defines no get_study()" in capsys.readouterr().err
    assert sweep.main(["sweep", str(wrong)], values) == 2
    assert "Received: int" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_main_rejects_missing_dataset(tmp_path, capsys):
    """A grid whose TFDS data is missing stops the sweep with one error
    before any folder is written, instead of failing every run."""
    config = tmp_path / "mnist_grid.py"
    config.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="mnist_grid", grids=(Grid(
                dataset="mnist", model="mlp", epochs=1,
                batch_sizes=(64, 128), learning_rates=(0.1,)),))
    """))
    data_dir = tmp_path / "no_data"
    output_dir = tmp_path / "out"
    values = parse_flags(f"--output_dir={output_dir}",
                         f"--data_dir={data_dir}")
    assert sweep.main(["sweep", str(config)], values) == 2
    error = capsys.readouterr().err
    assert "'mnist' was not found" in error
    assert f"tfds.builder('mnist', data_dir='{data_dir}')" in error
    assert not os.path.exists(output_dir)
    assert not os.path.exists(data_dir)


def test_dry_run_warns_about_missing_data(tmp_path, capsys):
    """A dry run may plan a sweep for another machine: data that is not
    prepared here gives a warning with the fix, and the runs are listed."""
    config = tmp_path / "mnist_grid.py"
    config.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="mnist_grid", grids=(Grid(
                dataset="mnist", model="mlp", epochs=1,
                batch_sizes=(64, 128), learning_rates=(0.1,),
                seeds=(0,)),))
    """))
    data_dir = tmp_path / "no_data"
    output_dir = tmp_path / "out"
    values = parse_flags(f"--output_dir={output_dir}",
                         f"--data_dir={data_dir}", "--dry_run")
    assert sweep.main(["sweep", str(config)], values) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("Warning: ")
    assert f"tfds.builder('mnist', data_dir='{data_dir}')" in captured.err
    assert captured.err.endswith(
        "The batch sizes of its runs are not checked.\n"
    )
    assert captured.out.splitlines() == [
        "mnist_mlp_e1/s64_lr0.1_seed0\tto train",
        "mnist_mlp_e1/s128_lr0.1_seed0\tto train",
        f"2 runs in {output_dir}",
    ]
    assert not os.path.exists(output_dir)
    assert not os.path.exists(data_dir)


@pytest.mark.parametrize("extra_flags", [(), ("--dry_run",)])
def test_main_rejects_batch_size_above_training_set(
    tmp_path, capsys, extra_flags
):
    """A grid batch size above the 4,000 training digits of mnist5k stops
    the sweep, or its dry run, with one error naming the grid, the batch
    size, the size of the training set and the fix, before any folder is
    written."""
    config = tmp_path / "big_batch.py"
    config.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="big_batch", grids=(Grid(
                dataset="mnist5k", model="mlp", epochs=1,
                batch_sizes=(64, 8000), learning_rates=(0.1,),
                seeds=(0,)),))
    """))
    output_dir = tmp_path / "out"
    values = parse_flags(f"--output_dir={output_dir}", *extra_flags)
    assert sweep.main(["sweep", str(config)], values) == 2
    error = capsys.readouterr().err
    assert error == (
        "Error: Invalid batch size 8000 in grid 'mnist5k_mlp_e1' (run "
        "s8000_lr0.1_seed0): the training set of 'mnist5k' has only 4000 "
        "examples. Lower the grid's batch_sizes to at most 4000.\n"
    )
    assert not os.path.exists(output_dir)


def test_check_batch_sizes_names_schedule():
    """A schedule whose last stage exceeds the training set is named with
    its grid; a schedule that fits passes."""
    grid = small_grid(
        epochs=5, batch_sizes=(32,), learning_rates=(0.1,), seeds=(0,),
        schedules=("s256-to-4096",), name="wide",
    )
    specs = study_lib.expand(small_study(grid), "o")
    with pytest.raises(ValueError) as error:
        study_lib.check_batch_sizes(specs)
    assert str(error.value) == (
        "Invalid batch size 4096 in grid 'wide' (run "
        "s256-to-4096_lr0.1_seed0): the training set of 'mnist5k' has only "
        "4000 examples. Lower the batch sizes of the schedule "
        "'s256-to-4096' in the grid's schedules to at most 4000."
    )
    fits = dataclasses.replace(grid, schedules=("s128-to-2048",))
    assert study_lib.check_batch_sizes(
        study_lib.expand(small_study(fits), "o")
    ) is None


def test_main_rejects_bad_option_before_training(tmp_path, capsys):
    """An option value that every run would reject stops the sweep with
    status 2 and one error naming the grid, option and value."""
    config = tmp_path / "bad_option.py"
    config.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="bad_option", grids=(Grid(
                dataset="mnist5k", model="mlp", epochs=1,
                batch_sizes=(64,), learning_rates=(0.1,), seeds=(0,),
                options={"gram_method": "slow"}, name="slow_grid"),))
    """))
    output_dir = tmp_path / "out"
    values = parse_flags(f"--output_dir={output_dir}")
    assert sweep.main(["sweep", str(config)], values) == 2
    assert capsys.readouterr().err == (
        "Error: In grid 'slow_grid': Invalid gram_method: expected 'fast' "
        "or 'tape'. Received: gram_method='slow'\n"
    )
    assert not os.path.exists(output_dir)


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"status": "completed", "con', "it is not valid JSON"),
        ("[]", "expected a JSON object, found list"),
    ],
)
def test_main_names_corrupt_summary(tmp_path, capsys, content, problem):
    """A summary.json that is not a JSON object is named, with the fix,
    and the sweep writes nothing."""
    output_dir = tmp_path / "out"
    spec = study_lib.expand(study_lib.load_study("smoke"), str(output_dir))[0]
    os.makedirs(spec.config.output_dir)
    path = os.path.join(spec.config.output_dir, "summary.json")
    with open(path, "w") as file:
        file.write(content)
    values = parse_flags(f"--output_dir={output_dir}")
    assert sweep.main(["sweep", "smoke"], values) == 2
    error = capsys.readouterr().err
    assert f"Invalid {path}: {problem}" in error
    assert "delete the run folder" in error
    assert sorted(os.listdir(output_dir)) == ["mnist5k_mlp_e1"]


@pytest.mark.parametrize(
    "argv, message",
    [(["sweep"], "missing arguments"),
     (["sweep", "smoke", "more"], "unexpected arguments: more")],
)
def test_main_wrong_argument_count_exits_2(argv, message, capsys):
    assert sweep.main(argv, parse_flags()) == 2
    assert message in capsys.readouterr().err


def test_bad_flag_exits_2(capsys):
    values = sweep.define_flags(flags.FlagValues())
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["sweep", "smoke", "--jobs=0"], values)
    assert exit_info.value.code == 2
    assert "--jobs=0" in capsys.readouterr().err


def test_main_interrupted_exits_130(monkeypatch, tmp_path, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    values = parse_flags(f"--output_dir={tmp_path}")
    assert sweep.main(["sweep", "smoke"], values) == 130
    assert "run the same command again" in capsys.readouterr().err


def process_ended(pid):
    """Return True when process `pid` has exited (a zombie or reaped).

    `Process.is_alive` cannot tell here: the pool's own thread may reap the
    worker first, after which `is_alive` reports it alive for good.
    """
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: reaped between the open and the read.
        return True
    return state in ("Z", "X")


def test_stop_workers_terminates_processes():
    pool = sweep._new_pool(2, 1)
    futures = [pool.submit(time.sleep, 60) for _ in range(3)]
    pids = [process.pid for process in pool._processes.values()]
    assert len(pids) == 2
    sweep._stop_workers(pool)
    # Every run ends: a queued one is cancelled, the running ones fail.
    for future in futures:
        with contextlib.suppress(concurrent.futures.CancelledError):
            assert future.exception(timeout=30) is not None
    deadline = time.monotonic() + 30
    while not all(process_ended(pid) for pid in pids):
        assert time.monotonic() < deadline, pids
        time.sleep(0.05)


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_pids(pid):
    """Return the ids of the live worker processes that process `pid`
    started with "spawn" (not its resource tracker)."""
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if (
            int(fields[1]) == pid
            and fields[0] not in ("Z", "X")
            and b"spawn_main" in command
        ):
            workers.append(int(entry))
    return workers


def wait_until_ended(pids, timeout=60):
    """Wait until every process in `pids` has ended; kill them and fail if
    one is still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not all(process_ended(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if not process_ended(pid)]
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes {alive} outlived the sweep")
        time.sleep(0.05)


_KILLED_PARENT = """
import os
import time

from experiments import sweep

pool = sweep._new_pool(1, 1)
# The first task runs after the worker's initializer.
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 600)
time.sleep(600)
"""


def test_worker_ends_with_killed_sweep():
    """SIGKILL gives the sweep no chance to stop its workers. They must end
    by themselves: a worker left running would write its summary.json into
    the folder that the next sweep trains again."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT],
        stdout=subprocess.PIPE, text=True, cwd=REPOSITORY,
    )
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    wait_until_ended([worker])


def test_sigterm_stops_sweep_workers(tmp_path):
    """SIGTERM, as `kill` or a job scheduler sends it, stops a real sweep
    as Ctrl-C does: the workers end, the run stays unfinished, and the
    status is 143."""
    config = tmp_path / "long.py"
    config.write_text(textwrap.dedent("""
        from experiments.study import Grid, Study

        def get_study():
            return Study(name="long", grids=(Grid(
                dataset="mnist5k", model="mlp", epochs=50,
                batch_sizes=(8,), learning_rates=(0.01,), seeds=(0,)),))
    """))
    folder = tmp_path / "out" / "mnist5k_mlp_e50" / "s8_lr0.01_seed0"
    epochs_csv = folder / "epochs.csv"
    # A file, not a pipe: a worker that outlived the sweep would hold a
    # pipe open.
    stderr_path = tmp_path / "stderr.txt"
    workers = []
    with open(stderr_path, "w") as stderr:
        sweep_process = subprocess.Popen(
            [sys.executable, "-m", "experiments.sweep", str(config),
             f"--output_dir={tmp_path / 'out'}"],
            stderr=stderr, cwd=REPOSITORY,
        )
    try:
        while not (epochs_csv.exists() and read_rows(epochs_csv)):
            assert sweep_process.poll() is None, stderr_path.read_text()
            time.sleep(0.1)
        workers = worker_pids(sweep_process.pid)
        sweep_process.send_signal(signal.SIGTERM)
        sweep_process.wait(timeout=120)
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()
            sweep_process.wait()
        wait_until_ended(workers)
    error = stderr_path.read_text()
    assert len(workers) == 1
    assert sweep_process.returncode == 143, error
    assert "run the same command again" in error
    assert run.read_summary(str(folder)) is None
    # The record shows that this sweep stopped before it trained its run.
    last_sweep = read_json(tmp_path / "out" / "sweep.json")["last_sweep"]
    assert last_sweep["trained"] == 0
    assert last_sweep["interrupted"]


def test_main_rejects_bad_config(capsys):
    assert sweep.main(["sweep", "no_such_study"], parse_flags()) == 2
    assert "not found" in capsys.readouterr().err


def read_rows(path):
    with open(path) as file:
        return file.read().splitlines()[1:]


def test_real_sweep_resumes_and_records_divergence(tmp_path, monkeypatch):
    """Two one-epoch MLP runs, one left interrupted by an earlier sweep, one
    at a learning rate that overflows, and a run that fails at once (a file
    is in the place of its grid folder, so its run folder cannot be
    written), in two pools of two workers that take one run each. A second
    sweep skips the two finished runs."""
    monkeypatch.setattr(sweep, "RUNS_PER_WORKER", 1)
    output_dir = str(tmp_path / "sweep")
    grid = study_lib.Grid(
        dataset="mnist5k", model="mlp", epochs=1, batch_sizes=(512,),
        learning_rates=(0.05, 1e6), seeds=(0,),
        options={"fisher_interval": 4},
    )
    blocked = dataclasses.replace(
        grid, learning_rates=(0.05,), name="blocked"
    )
    study = study_lib.Study(name="tiny", grids=(grid, blocked))
    good, bad, failed = [
        spec.name for spec in study_lib.expand(study, output_dir)
    ]
    blocking_file = os.path.join(output_dir, "blocked")
    os.makedirs(output_dir)
    with open(blocking_file, "w") as file:
        file.write("not a folder")
    # The interrupted run: files of an attempt without summary.json.
    interrupted = os.path.join(output_dir, good)
    os.makedirs(os.path.join(interrupted, "tensorboard"))
    epochs_path = os.path.join(interrupted, "epochs.csv")
    with open(epochs_path, "w") as file:
        file.write("epoch,test_error\n1,0.5\nstale row\n")

    outcomes = sweep.run_sweep(study, output_dir, jobs=2)
    status = {outcome.name: outcome.status for outcome in outcomes}
    assert status == {good: "completed", bad: "diverged", failed: "failed"}
    assert blocking_file in outcomes[2].message
    assert run.read_summary(os.path.join(output_dir, failed)) is None
    with open(blocking_file) as file:
        assert file.read() == "not a folder"
    assert len(read_rows(epochs_path)) == 1
    assert not any("stale" in row for row in read_rows(epochs_path))
    assert os.path.exists(os.path.join(interrupted, "train.log"))
    summary = run.read_summary(os.path.join(output_dir, bad))
    assert summary["status"] == "diverged"
    assert summary["diverged_at"]
    record = read_json(os.path.join(output_dir, "sweep.json"))
    assert record["runs"] == [good, bad, failed]
    assert record["last_sweep"]["trained"] == 3
    assert record["last_sweep"]["failed"] == 1
    assert not record["last_sweep"]["interrupted"]

    # Both runs are finished: nothing trains, and nothing is rewritten.
    summary_path = os.path.join(output_dir, good, "summary.json")
    stamp = os.path.getmtime(summary_path)
    study = dataclasses.replace(study, grids=(grid,))
    outcomes = sweep.run_sweep(study, output_dir, jobs=2)
    assert [outcome.status for outcome in outcomes] == ["skipped"] * 2
    assert [outcome.message for outcome in outcomes] == [
        "completed", "diverged"
    ]
    assert os.path.getmtime(summary_path) == stamp
    # The record of the sweep that trained is kept for the report.
    record = read_json(os.path.join(output_dir, "sweep.json"))
    assert record["runs"] == [good, bad]
    assert record["last_sweep"]["trained"] == 3
