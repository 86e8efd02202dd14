"""Read the run folders of a sweep into pandas DataFrames.

A run folder is any folder below the root that holds a `config.json` (see
`tf_fisher.run` for the layout). Runs with a `summary.json` are finished
(status "completed" or "diverged"); the others are unfinished and left out
of the tables. The run's group is the folder that contains it, relative to
the root: `experiments.sweep` puts the runs of one grid (one model, dataset
and number of epochs) into one folder.
"""

import csv
import json
import math
import os

import numpy as np
import pandas as pd

# Columns of the DataFrame that `load_runs` returns, one row per run.
RUN_COLUMNS = (
    "run",
    "group",
    "dataset",
    "model",
    "epochs",
    "schedule",
    "kind",
    "batch_size",
    "learning_rate",
    "seed",
    "status",
    "diverged",
    "epochs_completed",
    "train_error",
    "test_error",
    "mean_condition_number",
    "cumulative_fisher_energy",
    "wall_seconds",
)

# Final values read from a run's summary.
FINAL_KEYS = (
    "train_error",
    "test_error",
    "mean_condition_number",
    "cumulative_fisher_energy",
)

# Kinds of batch-size schedule.
FIXED = "fixed"
DYNAMIC = "dynamic"
MULTI_STEP = "multi-step"
ADAPTIVE = "adaptive"


def find_run_folders(root):
    """Return the folders below `root` that hold a config.json, sorted."""
    if not os.path.isdir(root):
        raise ValueError(
            f"Run folder root {root!r} is not a folder. Pass the "
            "--output_dir of a sweep."
        )
    found = []
    for folder, subfolders, files in os.walk(root):
        if "config.json" in files:
            found.append(folder)
            subfolders[:] = []
        else:
            subfolders.sort()
    return sorted(found)


def schedule_kind(schedule, batch_sizes):
    """Return FIXED, DYNAMIC, MULTI_STEP or ADAPTIVE for a run's batch-size
    schedule. An adaptive run records only its first batch size in its
    configuration, so its schedule name decides."""
    if schedule.startswith("adaptive"):
        return ADAPTIVE
    if len(set(batch_sizes)) <= 1:
        return FIXED
    if schedule.endswith("-MS"):
        return MULTI_STEP
    return DYNAMIC


def load_runs(root):
    """Return one row per finished run below `root`, with `RUN_COLUMNS`.

    `batch_size` is the fixed batch size, or NaN for a dynamic schedule.
    The final errors and measures come from the run's summary; a diverged
    run may have NaN there.
    """
    rows = []
    for folder in find_run_folders(root):
        summary = _read_json(os.path.join(folder, "summary.json"))
        if summary is not None:
            rows.append(_run_row(root, folder, summary))
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    return frame.sort_values(
        ["group", "kind", "learning_rate", "batch_size", "schedule", "seed"]
    ).reset_index(drop=True)


def unfinished_runs(root):
    """Return the relative paths of the run folders without a summary."""
    return [
        os.path.relpath(folder, root)
        for folder in find_run_folders(root)
        if not os.path.exists(os.path.join(folder, "summary.json"))
    ]


# The fix for a damaged file of a finished run, ending its error message.
_DAMAGED_RUN_FIX = (
    "Restore it, or move the run folder out of the sweep's folder (the "
    "sweep then trains the run again)."
)
# Columns of the run files that the report reads.
EPOCH_COLUMNS = (
    "epoch", "train_error", "test_error", "mean_condition_number",
    "cumulative_fisher_energy",
)
SAMPLE_COLUMNS = (
    "learning_rate", "mean_condition_number", "cumulative_fisher_energy",
)


def read_json_object(path, fix):
    """Return the object in the JSON file `path`, or None if there is no
    such file.

    Raises:
        ValueError: naming the file and ending with `fix`, the sentence that
            gives the next step, if it is not valid JSON or not an object.
    """
    # `tf_fisher.run.read_summary` makes the same checks for a run's
    # summary.json. It is not called here because importing tf_fisher
    # imports TensorFlow, which the report does not need.
    if not os.path.exists(path):
        return None
    with open(path) as file:
        try:
            content = json.load(file)
        except ValueError as error:
            raise ValueError(
                f"Invalid {path}: it is not valid JSON ({error}). {fix}"
            ) from None
    if not isinstance(content, dict):
        # A ValueError like the one above: the file's content is invalid.
        raise ValueError(  # noqa: TRY004
            f"Invalid {path}: expected a JSON object, found "
            f"{type(content).__name__}. {fix}"
        )
    return content


def _read_json(path):
    """Return the object in a run's JSON file, None if the file does not
    exist; raise ValueError naming the file if it is damaged."""
    return read_json_object(
        path,
        "The run writes it whole, so it was changed after the run. "
        + _DAMAGED_RUN_FIX,
    )


def _read_table(path, columns):
    """Return a run's CSV file as a DataFrame.

    Raises:
        ValueError: naming the file and the fix, if it cannot be parsed or
            lacks one of `columns`.
    """
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.EmptyDataError) as error:
        # pandas' ParserError and UnicodeDecodeError are ValueErrors.
        raise ValueError(
            f"Invalid {path}: it cannot be read as CSV ({error}). "
            f"{_DAMAGED_RUN_FIX}"
        ) from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(
            f"Invalid {path}: the columns {', '.join(missing)} are missing. "
            f"{_DAMAGED_RUN_FIX}"
        )
    # pandas fills the fields missing from a row cut short with NaN, which
    # a diverged run also writes, so the rows are counted here.
    with open(path, newline="") as file:
        lengths = [len(row) for row in csv.reader(file)]
    for number, length in enumerate(lengths[1:], start=2):
        if length != lengths[0]:
            raise ValueError(
                f"Invalid {path}: line {number} has {length} fields, the "
                f"header {lengths[0]}. {_DAMAGED_RUN_FIX}"
            )
    return frame


def _run_row(root, folder, summary):
    config = summary.get("config") or _read_json(
        os.path.join(folder, "config.json")
    )
    relative = os.path.relpath(folder, root)
    group = os.path.dirname(relative) or (
        f"{config['dataset']}_{config['model']}_e{config['epochs']}"
    )
    batch_sizes = list(config["batch_sizes"])
    kind = schedule_kind(config.get("schedule", ""), batch_sizes)
    final = summary.get("final", {})
    row = {
        "run": relative,
        "group": group,
        "dataset": config["dataset"],
        "model": config["model"],
        "epochs": int(config["epochs"]),
        "schedule": config.get("schedule") or f"s{batch_sizes[0]}",
        "kind": kind,
        "batch_size": float(batch_sizes[0]) if kind == FIXED else math.nan,
        "learning_rate": float(config["learning_rate"]),
        "seed": int(config["seed"]),
        "status": summary.get("status", ""),
        "diverged": summary.get("status") == "diverged",
        "epochs_completed": int(summary.get("epochs_completed", 0)),
        "wall_seconds": _number(summary.get("wall_seconds")),
    }
    row.update((key, _number(final.get(key))) for key in FINAL_KEYS)
    return row


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_epochs(root, runs):
    """Return the rows of every run's epochs.csv, with a `run` column.

    Args:
        root: the sweep's output folder.
        runs: the DataFrame from `load_runs`; its runs are read.

    Returns:
        A DataFrame with the epochs.csv columns plus `run`.
    """
    frames = []
    for name, status in zip(runs["run"], runs["status"]):
        path = os.path.join(root, name, "epochs.csv")
        frame = None
        if os.path.exists(path) and os.path.getsize(path):
            frame = _read_table(path, EPOCH_COLUMNS)
        if status == "completed" and (frame is None or frame.empty):
            raise ValueError(
                f"Invalid {path}: the run completed, but the file is "
                f"missing or has no rows. {_DAMAGED_RUN_FIX}"
            )
        if frame is not None:
            frame.insert(0, "run", name)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run", "epoch"])
    return pd.concat(frames, ignore_index=True)


def load_samples(root, runs):
    """Return the rows of every run's samples.csv, with time axes added.

    Adds `run`, `sample` (the sampled iteration k = 1, 2, ... of the run)
    and `cumulative_learning_rate` (the sum of the learning rates of the
    sampled iterations up to k, the time axis sum_k alpha_k of Liao et al.,
    "Approximate Fisher Information Matrix to Characterise the Training of
    Deep Neural Networks", TPAMI 2020).
    """
    frames = []
    for name in runs["run"]:
        path = os.path.join(root, name, "samples.csv")
        if os.path.exists(path) and os.path.getsize(path):
            frame = _read_table(path, SAMPLE_COLUMNS)
            frame.insert(0, "run", name)
            frame["sample"] = np.arange(1, len(frame) + 1)
            frame["cumulative_learning_rate"] = frame[
                "learning_rate"
            ].cumsum()
            frames.append(frame)
    if not frames:
        return pd.DataFrame(
            columns=["run", "sample", "cumulative_learning_rate"]
        )
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    import tools

    raise SystemExit(tools.print_not_a_command("tools.runs"))
