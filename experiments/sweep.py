"""Train the runs of a study in parallel processes, resuming where it stopped.

    python -m experiments.sweep mnist5k_cpu --output_dir=runs/cpu --jobs=2
    python -m experiments.sweep experiments/configs/cifar10_resnet110.py \\
        --output_dir=runs/cifar10_resnet110 --jobs=1
    python -m experiments.sweep mnist5k_cpu --dry_run

CONFIG is a configuration module (see `experiments.study.load_study`). Each
run trains in its own folder under `--output_dir` (see `experiments.study`).
A run whose folder has a `summary.json` is finished, whether it completed or
diverged, and is skipped. A folder without one contains an interrupted run,
so its files are deleted and the run starts again. A run that raises an
error is logged and left unfinished, so the next sweep retries it. The
sweep itself goes on, and exits with status 1 at the end. A dataset that is
not prepared, or a batch size larger than its training set, stops the sweep
before it writes anything, with status 2. `--dry_run` checks the batch sizes
too, and only warns about data that is not prepared.
Ctrl-C (status 130) or SIGTERM (status 143) stops the sweep and its
workers, and a worker ends by itself when the sweep process is killed. The
same command then resumes.

Runs train in `--jobs` worker processes (started with "spawn"), each of
which imports TensorFlow once and trains runs one after the other. The
sweep logs one line per finished run, with the runs left and an estimate of
the time left. Each run also logs its epochs to `train.log` in its folder.
Then `python -m tools.report OUTPUT_DIR` turns the folders into tables and
figures.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import logging as python_logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import threading
import time
import traceback

from absl import app
from absl import flags
from absl import logging

from experiments import study as study_lib
from tf_fisher import cli
from tf_fisher import data
from tf_fisher import run


def define_flags(flag_values=flags.FLAGS):
    """Define the command-line flags in `flag_values` and return it.

    The flags are defined only when the module runs as a program, so that
    importing it next to other programs' flags (such as those of
    `tf_fisher.train`) raises no duplicate-flag error.
    """
    flags.DEFINE_string(
        "output_dir", None,
        "Folder of the sweep's run folders (default: runs/{study name}).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "jobs", 1,
        "Number of runs that train at the same time, each in its own "
        "process.",
        lower_bound=1, flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "threads_per_job", 0,
        "TensorFlow intra-op and inter-op threads of each worker process; "
        "0 uses the number of CPU cores divided by --jobs.",
        lower_bound=0, flag_values=flag_values,
    )
    flags.DEFINE_list(
        "grids", [],
        "Train only the grids with these folder names (default: all grids "
        "of the study).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "data_dir", None,
        "TensorFlow Datasets folder for every grid, replacing the "
        "configuration's data_dir option (default: the configuration's, "
        "else TFDS's own).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "dry_run", False,
        "List the runs and whether each is finished, check their batch "
        "sizes, and train nothing.",
        flag_values=flag_values,
    )
    return flag_values


# Files and folders that `tf_fisher.run.train` and the sweep write into a run
# folder. An unfinished folder is deleted only if it contains nothing else.
RUN_FOLDER_ENTRIES = run.RUN_ENTRIES | {"train.log"}

# A pool of worker processes trains this many runs per job, then a fresh
# pool replaces it, which bounds any memory that TensorFlow keeps from run
# to run. The sweep replaces whole pools because ProcessPoolExecutor's own
# max_tasks_per_child can deadlock on Python 3.11 (CPython issue gh-115634).
RUNS_PER_WORKER = 16

# Config fields that may differ between a finished run and the sweep that
# finds it: where the data and the folder are, the progress display, and
# how much the probe overlaps backprop, which changes no result.
_RESULT_NEUTRAL_FIELDS = ("output_dir", "data_dir", "verbose", "block_overlap")


@dataclasses.dataclass
class Outcome:
    """The result of one run of a sweep.

    Attributes:
        name: the run folder relative to the sweep's output folder.
        status: "completed" or "diverged" (finished, with a summary.json),
            "skipped" (finished before this sweep), or "failed" (an error;
            the run stays unfinished).
        wall_seconds: training time of this sweep's attempt, 0 if skipped.
        cpu_seconds: CPU time of the worker process during the attempt,
            which stays comparable when other programs load the machine.
        test_error: final test error, NaN if unknown.
        message: the error of a failed run, or where a run diverged.
    """

    name: str
    status: str
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    test_error: float = float("nan")
    message: str = ""


def select_grids(study, names):
    """Return `study` restricted to the grids whose folder is in `names`.

    Raises:
        ValueError: naming the unknown grid and the available ones.
    """
    if not names:
        return study
    available = [grid.folder for grid in study.grids]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(
            f"Unknown grid {unknown[0]!r} in --grids. The study "
            f"{study.name!r} has: {', '.join(available)}."
        )
    grids = tuple(grid for grid in study.grids if grid.folder in names)
    return dataclasses.replace(study, grids=grids)


def with_data_dir(study, data_dir):
    """Return `study` with the `data_dir` option of every grid replaced;
    None returns `study` unchanged."""
    if not data_dir:
        return study
    grids = tuple(
        dataclasses.replace(
            grid, options={**grid.options, "data_dir": data_dir}
        )
        for grid in study.grids
    )
    return dataclasses.replace(study, grids=grids)


def finished_summary(spec):
    """Return the summary of a finished run, or None if it must (re)run.

    Raises:
        ValueError: if the folder contains a finished run of another
            configuration, which the sweep would otherwise silently keep.
    """
    summary = run.read_summary(spec.config.output_dir)
    if summary is None:
        return None
    differences = config_differences(summary.get("config", {}), spec.config)
    if differences:
        raise ValueError(
            f"Run folder {spec.config.output_dir} contains a finished run of "
            f"another configuration ({'; '.join(differences)}). Use another "
            "--output_dir, or delete the folder to train it again."
        )
    return summary


def config_differences(recorded, config):
    """Return "field: recorded != expected" strings for the fields in which
    a recorded config dict differs from a `RunConfig`.

    A field that the recorded config lacks, because it was written before
    the field existed, counts as the field's default.
    """
    expected = json.loads(json.dumps(dataclasses.asdict(config)))
    defaults = json.loads(json.dumps(dataclasses.asdict(run.RunConfig())))
    differences = []
    for key, value in expected.items():
        if key in _RESULT_NEUTRAL_FIELDS:
            continue
        recorded_value = recorded.get(key, defaults[key])
        if recorded_value != value:
            differences.append(f"{key}: {recorded_value!r} != {value!r}")
    return differences


def check_run_folder(path):
    """Raise ValueError if the folder at `path` contains a file that a run
    does not write, so that a wrong --output_dir deletes nothing of the
    user's."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ValueError(
                f"Run folder {path} is a file. Move it, or use another "
                "--output_dir."
            )
        return
    foreign = sorted(set(os.listdir(path)) - RUN_FOLDER_ENTRIES)
    if foreign:
        raise ValueError(
            f"Run folder {path} has no summary.json but contains files that a "
            f"run does not write: {', '.join(foreign)}. Move them, or use "
            "another --output_dir."
        )


def clear_run_folder(path):
    """Delete the files of an unfinished run so that it can start again.

    The folder and its lock file stay, so that a worker can hold the lock
    while it clears the folder and trains.

    Raises:
        ValueError: see `check_run_folder`.
    """
    check_run_folder(path)
    if not os.path.exists(path):
        return
    for name in os.listdir(path):
        if name == run.LOCK_FILE:
            continue
        entry = os.path.join(path, name)
        if os.path.isdir(entry):
            shutil.rmtree(entry)
        else:
            os.remove(entry)


def run_sweep(study, output_dir, jobs=1, threads_per_job=0):
    """Train the unfinished runs of `study` and return their `Outcome`s.

    Args:
        study: an `experiments.study.Study`.
        output_dir: folder of the run folders; `sweep.json` there records the
            study and its runs.
        jobs: number of worker processes that train at the same time.
        threads_per_job: TensorFlow threads per worker; 0 divides the CPU
            cores among the jobs.

    Returns:
        One `Outcome` per run of the study, in the study's order.

    Raises:
        ValueError: for an invalid study, a batch size larger than the
            training set, or a run folder that contains another
            configuration, raised before anything is written, or for
            another process that trains into `output_dir` (see
            `tf_fisher.run.folder_lock`).
        tf_fisher.data.DatasetNotFoundError: if the dataset of a run to
            train is not prepared, raised before anything is written.

    The sweep leaves `tf_fisher.run.LOCK_FILE` in `output_dir`.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(
            f"Invalid jobs={jobs!r}: expected a positive integer."
        )
    run.check_folder_path(output_dir)
    specs = study_lib.expand(study, output_dir)
    if not os.path.exists(os.path.join(output_dir, run.LOCK_FILE)):
        # Nothing is written before the checks pass.
        _finished_and_pending(specs)
        os.makedirs(output_dir, exist_ok=True)
    # Where an earlier sweep left the lock file, the lock comes first,
    # because that sweep may still be writing its run folders. The checks
    # then run again, since they may have changed before the lock was taken.
    with run.folder_lock(output_dir):
        outcomes, pending = _finished_and_pending(specs)
        return _train_locked(study, output_dir, specs, outcomes, pending,
                             jobs, threads_per_job)


def _finished_and_pending(specs):
    """Return (dict name -> `Outcome` of each finished run, list of the
    specs to train), after checking the folder and the batch sizes of each
    run to train."""
    outcomes = {}
    pending = []
    for spec in specs:
        summary = finished_summary(spec)
        if summary is None:
            check_run_folder(spec.config.output_dir)
            pending.append(spec)
        else:
            outcomes[spec.name] = _skipped(spec, summary)
    # Every run of a grid would fail on a missing dataset or a batch size
    # larger than the training set, each with its own traceback, so the
    # sweep checks the data before it starts.
    study_lib.check_batch_sizes(pending)
    return outcomes, pending


def _train_locked(study, output_dir, specs, outcomes, pending, jobs,
                  threads_per_job):
    """Record the sweep in sweep.json, train `pending` and return the
    outcomes of all `specs`; `run_sweep` holds the folder's lock."""
    record_path = os.path.join(output_dir, "sweep.json")
    record = _sweep_record(study, specs)
    # A sweep with nothing to train keeps the record of the last one that
    # trained, which the report shows.
    last_sweep = _read_last_sweep(record_path)
    if not pending and last_sweep:
        record["last_sweep"] = last_sweep
    run.write_json_atomically(record_path, record)
    start = time.time()
    logging.info(
        "Study %s: %d runs, %d finished before, %d to train with %d jobs "
        "into %s",
        study.name, len(specs), len(outcomes), len(pending), jobs, output_dir,
    )
    if pending:
        threads = threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
        trained = []
        try:
            for outcome in _train_pending(pending, jobs, threads):
                outcomes[outcome.name] = outcome
                trained.append(outcome)
        finally:
            # Written also when Ctrl-C or SIGTERM stops the sweep, so that
            # the report shows what this sweep trained before it stopped.
            record["last_sweep"] = {
                "trained": len(trained),
                "failed": sum(
                    outcome.status == "failed" for outcome in trained
                ),
                "jobs": jobs,
                "threads_per_job": threads,
                "wall_seconds": time.time() - start,
                "interrupted": len(trained) < len(pending),
            }
            run.write_json_atomically(record_path, record)
    return [outcomes[spec.name] for spec in specs]


def _read_last_sweep(record_path):
    """Return the "last_sweep" entry of a sweep.json, or None if the file
    is missing, unreadable or has no such entry."""
    try:
        with open(record_path) as file:
            return json.load(file).get("last_sweep")
    except (OSError, ValueError, AttributeError):
        return None


def _skipped(spec, summary):
    final = summary.get("final", {})
    return Outcome(
        name=spec.name,
        status="skipped",
        test_error=_to_float(final.get("test_error")),
        message=summary.get("status", ""),
    )


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _sweep_record(study, specs):
    return {
        "study": study.name,
        "description": study.description,
        "grids": [dataclasses.asdict(grid) for grid in study.grids],
        "runs": [spec.name for spec in specs],
    }


def _train_pending(pending, jobs, threads):
    """Yield an `Outcome` per pending run as the runs finish."""
    queue = list(pending)
    total = len(queue)
    start = time.time()
    finished = 0
    while queue:
        pool = _new_pool(jobs, threads)
        running = {}
        quota = RUNS_PER_WORKER * jobs
        try:
            while running or (queue and quota):
                while queue and quota and len(running) < jobs:
                    spec = queue.pop(0)
                    with _interrupts_ignored():
                        future = pool.submit(train_in_worker, spec.config)
                    running[future] = spec
                    quota -= 1
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    spec = running.pop(future)
                    outcome = _collect(future, spec)
                    finished += 1
                    _log_progress(outcome, finished, total, start)
                    yield outcome
                    if outcome.message == _WORKER_LOST:
                        raise _PoolBroken
        except _PoolBroken:
            # A pool takes no new work once a worker died. The runs it was
            # training count as failed, and the queue goes to a new pool.
            for future, spec in running.items():
                outcome = _collect(future, spec)
                finished += 1
                _log_progress(outcome, finished, total, start)
                yield outcome
        except KeyboardInterrupt:
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _interrupts_ignored():
    """Ignore SIGINT while `submit` starts worker processes.

    A spawned worker keeps the ignored SIGINT, so Ctrl-C reaches only this
    process, which stops the workers. Otherwise each worker would print its
    own KeyboardInterrupt traceback. Signal handlers can change only in the
    main thread, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_workers(pool):
    """Terminate the worker processes of `pool` and drop its queued runs."""
    # NOTE: `_processes` is private to ProcessPoolExecutor (checked on
    # Python 3.11); Python 3.14 adds a public `terminate_workers`.
    for process in list((pool._processes or {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


class _PoolBroken(Exception):
    """A worker process of the pool died."""


_WORKER_LOST = "the worker process died (killed, out of memory or crashed)"


def _new_pool(jobs, threads):
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    )


def _collect(future, spec):
    try:
        result = future.result()
    except concurrent.futures.process.BrokenProcessPool:
        return Outcome(spec.name, "failed", message=_WORKER_LOST)
    return Outcome(name=spec.name, **result)


def _log_progress(outcome, finished, total, start):
    """Log one line per finished run. The time left is an estimate: the
    sweep's time so far per finished run, times the runs left."""
    left = total - finished
    remaining = format_duration((time.time() - start) / finished * left)
    if outcome.status == "failed":
        logging.error(
            "[%d/%d] %s failed: %s. %d left, about %s to go.",
            finished, total, outcome.name, outcome.message, left, remaining,
        )
        return
    logging.info(
        "[%d/%d] %s %s in %.1f s (%.1f s CPU), test error %.2f%%. %d left, "
        "about %s to go.",
        finished, total, outcome.name, outcome.status, outcome.wall_seconds,
        outcome.cpu_seconds, 100 * outcome.test_error, left, remaining,
    )


def format_duration(seconds):
    """Return a duration as "1 h 02 min", "3 min 05 s" or "42 s"."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


def _init_worker(threads):
    """Set up a worker process: end it with the sweep, quiet TensorFlow, and
    set its thread counts."""
    _exit_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    # Log lines go to each run's train.log; the worker's stderr gets only
    # warnings and errors, so that the sweep's progress lines stay readable.
    logging.set_verbosity(logging.INFO)
    absl_logger = python_logging.getLogger("absl")
    absl_logger.propagate = False
    console = python_logging.StreamHandler(sys.stderr)
    console.setLevel(python_logging.WARNING)
    console.setFormatter(
        python_logging.Formatter("%(levelname)s worker: %(message)s")
    )
    absl_logger.addHandler(console)


def _exit_with_parent():
    """End this worker process as soon as the sweep process ends.

    A sweep killed with SIGKILL cannot stop its workers. Left running, a
    worker would finish its run and write its summary.json into a folder
    that the next sweep has cleared and is training again, so that folder
    would look finished while its CSV files held a partial run. So a thread
    waits on the parent's sentinel, which becomes ready when the parent
    exits, and then ends the process. The next sweep trains its unfinished
    run again.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_for_parent():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(
        target=wait_for_parent, name="exit_with_parent", daemon=True
    ).start()


def train_in_worker(config):
    """Train one run in the calling process and return `Outcome` fields.

    Deletes the files of an earlier, interrupted attempt first. The worker
    holds the run folder's lock from before it deletes anything until the
    run ends, so a `tf_fisher.train` run training into the same folder
    makes this run fail instead of losing its records, and the other way
    round. Errors are caught and returned as a "failed" outcome, so that
    one bad run does not stop the sweep. The traceback goes to the run's
    `train.log`.
    """
    import keras

    start = time.time()
    cpu_start = time.process_time()
    handler = None
    try:
        check_run_folder(config.output_dir)
        os.makedirs(config.output_dir, exist_ok=True)
        with run.folder_lock(config.output_dir, resumable=False):
            clear_run_folder(config.output_dir)
            handler = _log_to_file(
                os.path.join(config.output_dir, "train.log")
            )
            summary = run.train(config, splits=_load_splits(config))
    except Exception as error:  # noqa: BLE001 (the sweep must go on)
        if handler is not None:
            logging.error("Run failed:\n%s", traceback.format_exc())
        return {
            "status": "failed",
            "wall_seconds": time.time() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "message": f"{type(error).__name__}: {error}",
        }
    finally:
        if handler is not None:
            python_logging.getLogger("absl").removeHandler(handler)
            # On a full disk the log cannot be flushed, and that must not
            # replace the run's outcome.
            with contextlib.suppress(OSError):
                handler.close()
        keras.backend.clear_session()
    return {
        "status": summary["status"],
        "wall_seconds": time.time() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "test_error": _to_float(summary["final"].get("test_error")),
        "message": summary.get("diverged_at") or "",
    }


# Datasets a worker process has loaded, by (name, data folder); runs of one
# grid share them, which saves reading and normalising the images per run.
_SPLITS = {}


def _load_splits(config):
    key = (config.dataset, config.data_dir)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = data.load_dataset(config.dataset, config.data_dir)
    return _SPLITS[key]


def _log_to_file(path):
    handler = python_logging.FileHandler(path)
    handler.setFormatter(
        python_logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    python_logging.getLogger("absl").addHandler(handler)
    return handler


def main(argv, flag_values=flags.FLAGS):
    """Run the sweep of the configuration named in `argv[1]`; return the
    exit status (0 done, 1 some runs failed, 2 invalid input, 130
    interrupted by Ctrl-C, 143 stopped by SIGTERM)."""
    usage = (
        "python -m experiments.sweep CONFIG [flags], with CONFIG one of "
        f"{', '.join(study_lib.available_configs())}."
    )
    if not cli.check_arguments(argv, 1, usage):
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    output_dir = flag_values.output_dir
    try:
        with _terminated_as_interrupt():
            study = _load_study(argv[1], flag_values)
            output_dir = flag_values.output_dir or os.path.join(
                "runs", study.name
            )
            if flag_values.dry_run:
                _list_runs(study, output_dir)
                return 0
            outcomes = run_sweep(
                study, output_dir, flag_values.jobs,
                flag_values.threads_per_job,
            )
    except (ValueError, data.DatasetNotFoundError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"Error: the sweep could not write in "
            f"{output_dir or 'its output folder'}: {error}. "
            "The finished runs are kept. Free space, then run the same "
            "command again.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as interrupt:
        print(
            "Interrupted. The finished runs are kept; run the same command "
            "again to train the rest.",
            file=sys.stderr,
        )
        return 143 if isinstance(interrupt, _Terminated) else 130
    counts = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    logging.info(
        "Sweep done: %s. Report: python -m tools.report %s",
        ", ".join(f"{count} {status}" for status, count in counts.items()),
        output_dir,
    )
    return 1 if counts.get("failed") else 0


def _load_study(spec, flag_values):
    """Return the study of `spec` with the --grids and --data_dir flags
    applied.

    Raises:
        ValueError: for a configuration that is not found or invalid,
            including one whose get_study is missing or returns no Study.
    """
    try:
        study = study_lib.load_study(spec)
    except TypeError as error:
        raise ValueError(str(error)) from error
    study = select_grids(study, flag_values.grids)
    return with_data_dir(study, flag_values.data_dir)


class _Terminated(KeyboardInterrupt):
    """SIGTERM reached the sweep."""


@contextlib.contextmanager
def _terminated_as_interrupt():
    """Make SIGTERM stop the sweep as Ctrl-C does.

    Python's default SIGTERM ends the process at once, without stopping its
    worker processes, which would go on training (see `_exit_with_parent`).
    Here SIGTERM raises `_Terminated`, a KeyboardInterrupt, so the sweep
    terminates its workers first. Signal handlers can change only in the
    main thread, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _list_runs(study, output_dir):
    run.check_folder_path(output_dir)
    specs = study_lib.expand(study, output_dir)
    # A dry run may plan a sweep for another machine, so data that is not
    # prepared here is a warning, but a batch size that no data fits is an
    # error, as in the sweep.
    try:
        study_lib.check_batch_sizes(specs)
    except data.DatasetNotFoundError as error:
        print(
            f"Warning: {error} The batch sizes of its runs are not checked.",
            file=sys.stderr,
        )
    if _held_by_another(output_dir):
        print(
            f"Warning: another process is training into {output_dir}, so "
            "the runs it has not finished yet show as 'to train'.",
            file=sys.stderr,
        )
    for spec in specs:
        summary = finished_summary(spec)
        if summary is None:
            # The sweep would stop on this folder, so the dry run does too.
            check_run_folder(spec.config.output_dir)
        state = summary["status"] if summary else "to train"
        print(f"{spec.name}\t{state}")
    print(f"{len(specs)} runs in {output_dir}")


def _held_by_another(output_dir):
    """Return True if another process holds the lock of `output_dir`. A
    folder without the lock file is not locked, and none is created."""
    if not os.path.exists(os.path.join(output_dir, run.LOCK_FILE)):
        return False
    try:
        with run.folder_lock(output_dir):
            return False
    except ValueError:
        return True


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
