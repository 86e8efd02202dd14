"""Fixed batch sizes, dynamic schedules and adaptive policies at equal epochs.

    python -m experiments.adaptive_study --output_dir=runs/adaptive_cpu

Trains the MLP on the embedded 5,000-digit MNIST sample (4,000 train and
1,000 test digits, no download) for 20 epochs at learning rate 0.05, with
seeds 0, 1 and 2:

* the fixed batch sizes 32, 64, 128, 256 and 512;
* the dynamic-sampling schedules of Liao et al., "Approximate Fisher
  Information Matrix to Characterise the Training of Deep Neural Networks",
  IEEE TPAMI 2020: s32-to-512, s512-to-32, s32-to-128 and s32-to-512-MS;
* the three batch-size policies of `tf_fisher.batch_size_policies`, within
  the smallest and largest fixed sizes, keeping a size for at least 2
  epochs: the norm test (θ = 0.9) and the noise scale (target B_simple),
  both starting at the smallest fixed size, and the measure-guided policy,
  whose beacons are the runs of the fixed size with the lowest mean test
  error (all seeds, band widened by 10%). The measure-guided policy starts
  at the largest fixed size, because a run that starts at its beacon's
  batch size and stays near the beacon only copies it.

All runs probe the Gram matrix every 5 steps. The fixed and schedule runs
use the run folders of `experiments.study`
(`{grid}/{schedule}_lr{rate}_seed{seed}`), the policies
`{grid}/adaptive-{policy}_lr{rate}_seed{seed}`. A run whose folder has a
`summary.json` is reused, so an interrupted study resumes; delete a folder
to train it again. The study then writes, into `--output_dir`:

* `adaptive_table.md` and `adaptive_table.csv`: per configuration the test
  error (mean ± std over seeds), wall time, optimizer steps, final C̄_K and
  L_K, and the Welch t-test p-value of the test errors against the best
  fixed batch size;
* `adaptive_verdict.md`: for each policy, whether it matches the best fixed
  size's test error (Welch p >= 0.05, or a lower mean) and with how many
  steps and how much wall time;
* `adaptive_trajectories.png`: the (C̄_K, L_K) trajectories, per-epoch
  geometric means over seeds.

Run time, measured: the whole study (36 runs: 12 configurations x 3 seeds)
took 5 min 58 s on a 2-core AMD EPYC virtual machine (TensorFlow 2.21, no
GPU) while another process kept one core about half busy. Runs train one
after the other in this process, with TensorFlow on all cores; each new
batch size costs about 2 s of tracing.

A check of the whole pipeline, which took 56 s and 80 s in two tries on the
same machine:

    python -m experiments.adaptive_study --output_dir=/tmp/adaptive_tiny \\
        --epochs=5 --seeds=0,1 --fixed_sizes=32,512 --schedules=s32-to-512
"""

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from experiments import study as study_lib
from experiments import sweep
from tf_fisher import adaptive
from tf_fisher import batch_size_policies
from tf_fisher import cli
from tf_fisher import run

FLAGS = flags.FLAGS


def define_flags():
    """Define the command-line flags; called only when the module runs as a
    program, so that importing it defines no flags."""
    flags.DEFINE_string(
        "output_dir", "runs/adaptive_cpu", "Folder of the run folders, table, "
        "verdict and figure.",
    )
    flags.DEFINE_integer("epochs", 20, "Epochs of every run.", lower_bound=1)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one run per seed and "
                      "configuration.")
    flags.DEFINE_list(
        "fixed_sizes", ["32", "64", "128", "256", "512"], "Fixed batch sizes. "
        "The policies stay within the smallest and largest. The norm-test "
        "and noise-scale policies start at the smallest, the measure-guided "
        "policy at --measure_first_batch_size.",
    )
    flags.DEFINE_list(
        "schedules",
        ["s32-to-512", "s512-to-32", "s32-to-128", "s32-to-512-MS"],
        "Dynamic-sampling schedules (see tf_fisher.schedules.parse_schedule).",
    )
    flags.DEFINE_list(
        "policies", list(batch_size_policies.POLICY_NAMES),
        "Adaptive batch-size policies.",
    )
    flags.DEFINE_float("learning_rate", 0.05, "Initial learning rate of every "
                       "run.")
    flags.DEFINE_integer("fisher_interval", 5, "Steps between probes.",
                         lower_bound=1)
    flags.DEFINE_integer("min_epochs_per_size", 2, "Minimum epochs per batch "
                         "size of the policies.", lower_bound=1)
    flags.DEFINE_float("norm_test_theta", 0.9, "θ of the norm-test policy.")
    flags.DEFINE_integer(
        "measure_first_batch_size", 0, "First batch size of the measure-guided "
        "policy, within the range of --fixed_sizes. 0 takes the largest.",
        lower_bound=0,
    )
    flags.DEFINE_float(
        "noise_scale_multiplier", 1.0, "Target batch size of the "
        "noise-scale policy, in units of B_simple.",
    )
    # The comparisons reject NaN, which absl's bounds let through.
    flags.register_validator(
        "learning_rate", lambda value: 0 < value < math.inf,
        message="must be a positive finite number",
    )
    flags.register_validator(
        "norm_test_theta", lambda value: 0 < value < 1,
        message="must be a number in (0, 1), for example 0.9",
    )
    flags.register_validator(
        "noise_scale_multiplier", lambda value: 0 < value < math.inf,
        message="must be a positive finite number, for example 1.0",
    )


DATASET = "mnist5k"
MODEL = "mlp"

# Files that a run of this study writes into its folder. An unfinished
# folder is deleted only if it contains nothing else.
RUN_FILES = run.RUN_ENTRIES

FIXED, SCHEDULE, ADAPTIVE = "fixed", "schedule", "adaptive"

# A policy counts as faster than the best fixed size when its mean wall time
# is below this fraction of the fixed size's. In a 5-epoch check on 2 shared
# CPU cores, configurations that trained identically (same batch sizes and
# seeds) had mean wall times from 3.5 s to 4.1 s, 16% apart.
WALL_TIME_MARGIN = 0.8


@dataclasses.dataclass
class Configuration:
    """One configuration of the study and the summaries of its seeds."""

    name: str
    kind: str
    summaries: list = dataclasses.field(default_factory=list)
    folders: list = dataclasses.field(default_factory=list)

    def finals(self, key):
        return [summary["final"][key] for summary in self.summaries]

    def values(self, key):
        if key == "steps":
            return [s["measures"]["num_iterations"] for s in self.summaries]
        if key == "wall_seconds":
            return [s["wall_seconds"] for s in self.summaries]
        return self.finals(key)


def baseline_grid(settings):
    """Return the `experiments.study.Grid` of the fixed sizes and
    schedules."""
    return study_lib.Grid(
        dataset=DATASET,
        model=MODEL,
        epochs=settings["epochs"],
        batch_sizes=tuple(settings["fixed_sizes"]),
        learning_rates=(settings["learning_rate"],),
        seeds=tuple(settings["seeds"]),
        schedules=tuple(settings["schedules"]),
        schedule_learning_rate=settings["learning_rate"],
        options={"fisher_interval": settings["fisher_interval"]},
        name=f"{DATASET}_{MODEL}_e{settings['epochs']}_adaptive",
    )


def train_or_reuse(config, train, policy=None):
    """Return the summary of a finished run folder, or train the run.

    Raises:
        ValueError: if the folder contains a finished run of another
            configuration or policy.
    """
    summary = run.read_summary(config.output_dir)
    if summary is None:
        clear_unfinished(config.output_dir)
        return train()
    differences = sweep.config_differences(summary["config"], config)
    if policy is not None and summary.get("adaptive") != json.loads(
        json.dumps(policy.describe())
    ):
        differences.append("adaptive")
    if differences:
        raise ValueError(
            f"Invalid run folder {config.output_dir}: it contains a "
            f"finished run with other settings ({', '.join(differences)}). "
            "Use another --output_dir, or delete the folder to train it "
            "again."
        )
    logging.info("Reusing the finished run %s", config.output_dir)
    return summary


def clear_unfinished(path):
    """Delete an unfinished run folder that contains only run files.

    Raises:
        ValueError: if the folder contains other files.
    """
    if not os.path.isdir(path):
        return
    foreign = sorted(set(os.listdir(path)) - RUN_FILES)
    if foreign:
        raise ValueError(
            f"Invalid run folder {path}: it has no summary.json but "
            "contains files that a run does not write: "
            f"{', '.join(foreign)}. Move them, or use another --output_dir."
        )
    shutil.rmtree(path)


def run_baselines(settings, output_dir, splits):
    """Train (or reuse) the fixed and schedule runs; return Configurations."""
    grid = baseline_grid(settings)
    specs = study_lib.expand(study_lib.Study("adaptive", (grid,)), output_dir)
    configurations = {}
    for spec in specs:
        config = spec.config
        kind = SCHEDULE if "-to-" in config.schedule else FIXED
        configuration = configurations.setdefault(
            config.schedule, Configuration(config.schedule, kind)
        )
        configuration.summaries.append(train_or_reuse(
            config, lambda config=config: run.train(config, splits=splits)
        ))
        configuration.folders.append(config.output_dir)
    return list(configurations.values()), grid.folder


def best_fixed(configurations):
    """Return the fixed-size Configuration with the lowest mean test error
    among those none of whose runs diverged.

    A diverged run has fewer epochs than the others, so it can be neither
    the reference of the table nor a beacon of the measure policy.

    Raises:
        ValueError: if every fixed size has a diverged run.
    """
    fixed = [c for c in configurations if c.kind == FIXED]
    stable = [c for c in fixed if not _diverged_count(c)]
    if not stable:
        counts = ", ".join(
            f"{c.name} ({_diverged_count(c)} of {len(c.summaries)})"
            for c in fixed
        )
        rate = fixed[0].summaries[0]["config"]["learning_rate"]
        raise ValueError(
            f"Every fixed batch size has diverged runs at learning rate "
            f"{rate:g}: {counts}. The study needs a fixed size without "
            f"diverged runs as its reference. Lower --learning_rate, for "
            f"example to --learning_rate={rate / 10:g}."
        )
    return min(stable, key=lambda c: _mean(c.finals("test_error")))


def _diverged_count(configuration):
    return sum(
        summary["status"] == "diverged"
        for summary in configuration.summaries
    )


def run_policies(settings, output_dir, grid_folder, beacon, splits):
    """Train (or reuse) the adaptive runs; return Configurations."""
    sizes = settings["fixed_sizes"]
    configurations = []
    for name in settings["policies"]:
        configuration = Configuration(f"adaptive-{name}", ADAPTIVE)
        first_size = min(sizes)
        if name == "measure":
            first_size = settings["measure_first_batch_size"] or max(sizes)
        for seed in settings["seeds"]:
            config = run.RunConfig(
                dataset=DATASET,
                model=MODEL,
                epochs=settings["epochs"],
                learning_rate=settings["learning_rate"],
                batch_sizes=(first_size,),
                schedule=configuration.name,
                seed=seed,
                fisher_interval=settings["fisher_interval"],
                output_dir=os.path.join(
                    output_dir, grid_folder,
                    study_lib.run_name(
                        configuration.name, settings["learning_rate"], seed
                    ),
                ),
            )
            policy = batch_size_policies.make_policy(
                name,
                settings["epochs"],
                min_batch_size=min(sizes),
                max_batch_size=max(sizes),
                min_epochs_per_size=settings["min_epochs_per_size"],
                theta=settings["norm_test_theta"],
                multiplier=settings["noise_scale_multiplier"],
                beacon_dirs=beacon.folders if name == "measure" else (),
            )
            configuration.summaries.append(train_or_reuse(
                config,
                lambda config=config, policy=policy: adaptive.train_adaptive(
                    config, policy, splits=splits
                ),
                policy,
            ))
            configuration.folders.append(config.output_dir)
        configurations.append(configuration)
    return configurations


def _mean(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _std(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(
        sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    )


def welch_p_value(first, second):
    """Return the two-sided p-value of Welch's t-test, NaN when undefined
    (fewer than two finite values on a side, or no variance on both)."""
    from scipy import stats

    first = [v for v in first if math.isfinite(v)]
    second = [v for v in second if math.isfinite(v)]
    if len(first) < 2 or len(second) < 2:
        return math.nan
    if len(set(first)) == 1 and len(set(second)) == 1:
        return math.nan
    return float(stats.ttest_ind(first, second, equal_var=False).pvalue)


TABLE_COLUMNS = (
    "configuration", "kind", "batch_sizes", "test_error_mean",
    "test_error_std", "p_value", "wall_seconds_mean", "wall_seconds_std",
    "steps_mean", "mean_condition_number", "cumulative_fisher_energy",
    "num_seeds",
)


def table_rows(configurations, best):
    """Return one dict per configuration, keyed by TABLE_COLUMNS."""
    best_errors = best.finals("test_error")
    rows = []
    for configuration in configurations:
        errors = configuration.finals("test_error")
        rows.append({
            "configuration": configuration.name,
            "kind": configuration.kind,
            "batch_sizes": _size_summary(configuration),
            "test_error_mean": _mean(errors),
            "test_error_std": _std(errors),
            "p_value": (
                math.nan if configuration is best
                else welch_p_value(errors, best_errors)
            ),
            "wall_seconds_mean": _mean(configuration.values("wall_seconds")),
            "wall_seconds_std": _std(configuration.values("wall_seconds")),
            "steps_mean": _mean(configuration.values("steps")),
            "mean_condition_number": _mean(
                configuration.finals("mean_condition_number")
            ),
            "cumulative_fisher_energy": _mean(
                configuration.finals("cumulative_fisher_energy")
            ),
            "num_seeds": len(configuration.summaries),
        })
    return rows


def _size_summary(configuration):
    """Return the batch sizes by epoch of the first seed, run-length coded,
    e.g. "32x2 128x18"."""
    summary = configuration.summaries[0]
    sizes = summary.get("batch_sizes")
    if sizes is None:
        sizes = []
        for stage in summary["stages"]:
            count = stage["last_epoch"] - stage["first_epoch"] + 1
            sizes += [stage["batch_size"]] * count
    return adaptive.format_size_runs(sizes, separator=" ")


def write_table(rows, best, output_dir):
    """Write adaptive_table.csv and adaptive_table.md."""
    with open(os.path.join(output_dir, "adaptive_table.csv"), "w",
              newline="") as file:
        writer = csv.DictWriter(file, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = (
        "| configuration | batch sizes (seed 0) | test error % | p vs "
        f"{best.name} | wall s | steps | C_K | L_K |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['configuration']} | {row['batch_sizes']} | "
            f"{_cell(row['test_error_mean'], row['test_error_std'], 100)} | "
            f"{_format_p(row['p_value'])} | "
            f"{_cell(row['wall_seconds_mean'], row['wall_seconds_std'])} | "
            f"{row['steps_mean']:.0f} | {row['mean_condition_number']:.4g} | "
            f"{row['cumulative_fisher_energy']:.4g} |"
        )
    with open(os.path.join(output_dir, "adaptive_table.md"), "w") as file:
        file.write("\n".join(lines) + "\n")


def _cell(mean, std, scale=1.0):
    text = f"{scale * mean:.2f}"
    if math.isfinite(std):
        text += f" ± {scale * std:.2f}"
    return text


def _format_p(value):
    return "-" if not math.isfinite(value) else f"{value:.3g}"


def matches_best(row, reference):
    """Return True if a row's test error matches the reference row's: a
    mean no higher, or a Welch p-value of at least 0.05."""
    if row["test_error_mean"] <= reference["test_error_mean"]:
        return True
    return math.isfinite(row["p_value"]) and row["p_value"] >= 0.05


def saves_cost(row, reference):
    """Return True if a row takes fewer optimizer steps than the reference,
    or less than `WALL_TIME_MARGIN` of its wall time."""
    if row["steps_mean"] < reference["steps_mean"]:
        return True
    margin = WALL_TIME_MARGIN * reference["wall_seconds_mean"]
    return row["wall_seconds_mean"] < margin


def _policy_line(row, reference, matches):
    error = _cell(row["test_error_mean"], row["test_error_std"], 100)
    step_ratio = row["steps_mean"] / reference["steps_mean"]
    time_ratio = row["wall_seconds_mean"] / reference["wall_seconds_mean"]
    return (
        f"- {row['configuration']}: test error {error}% "
        f"(Welch p = {_format_p(row['p_value'])}; "
        f"{'matches' if matches else 'does not match'}), "
        f"{row['steps_mean']:.0f} steps ({step_ratio:.2f}x), "
        f"{row['wall_seconds_mean']:.1f} s ({time_ratio:.2f}x); batch "
        f"sizes {row['batch_sizes']}."
    )


def verdict_lines(rows, best):
    """Return Markdown lines saying, per policy, whether it matches the best
    fixed size's test error with fewer steps or less wall time."""
    reference = next(r for r in rows if r["configuration"] == best.name)
    error = _cell(
        reference["test_error_mean"], reference["test_error_std"], 100
    )
    first = (
        f"Best fixed batch size: {best.name}, test error {error}%, "
        f"{reference['steps_mean']:.0f} steps, "
        f"{reference['wall_seconds_mean']:.1f} s."
    )
    lines = [first, ""]
    winners = []
    for row in rows:
        if row["kind"] != ADAPTIVE:
            continue
        matches = matches_best(row, reference)
        if matches and saves_cost(row, reference):
            winners.append(row["configuration"])
        lines.append(_policy_line(row, reference, matches))

    lines.append("")
    if winners:
        lines.append(
            f"Matching the best fixed size with fewer steps or less wall "
            f"time: {', '.join(winners)}."
        )
    else:
        lines.append(
            "No adaptive policy matches the best fixed size's test error "
            "with fewer steps or less wall time."
        )
    lines.append(
        "A match is a mean test error no higher than the best fixed size's, "
        "or a Welch p-value of at least 0.05. With few seeds the test has "
        "little power, so a match is weak evidence of equal error. Less "
        f"wall time means a mean below {WALL_TIME_MARGIN:g} times the best "
        "fixed size's, because identical runs differ by timing noise."
    )
    return lines


def plot_trajectories(configurations, path):
    """Plot the (C̄_K, L_K) trajectory of every configuration, per-epoch
    geometric means over seeds, on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    styles = {FIXED: ":", SCHEDULE: "--", ADAPTIVE: "-"}
    figure, axes = pyplot.subplots(figsize=(7, 5))
    for configuration in configurations:
        conditions, energies, count = _mean_trajectory(configuration.folders)
        label = configuration.name
        if count < len(configuration.folders):
            label += f" ({count} of {len(configuration.folders)} runs)"
        line, = axes.plot(
            conditions, energies, styles[configuration.kind],
            linewidth=2.0 if configuration.kind == ADAPTIVE else 1.2,
            label=label,
        )
        axes.plot(conditions[-1], energies[-1], "o", color=line.get_color())
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("C̄_K (mean truncated condition number)")
    axes.set_ylabel("L_K (cumulative weighted energy)")
    axes.set_title("Trajectories over epochs; dots mark the last epoch")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _mean_trajectory(folders):
    """Return the geometric means of C̄_K and L_K at each epoch over the
    runs in `folders`, and the number of runs averaged.

    Only the runs that reached the last epoch with finite measures count,
    so a run that diverged early does not cut the others short.
    """
    import numpy as np

    curves = []
    for folder in folders:
        with open(os.path.join(folder, "epochs.csv"), newline="") as file:
            rows = list(csv.DictReader(file))
        curves.append([
            (float(row["mean_condition_number"]),
             float(row["cumulative_fisher_energy"]))
            for row in rows
        ])
    length = max(len(curve) for curve in curves)
    complete = [
        curve for curve in curves
        if len(curve) == length and np.all(np.isfinite(curve))
        and np.all(np.array(curve) > 0)
    ]
    # When every run stopped early, the longest curve is used alone.
    if not complete:
        complete = [max(curves, key=len)]
    values = np.log(np.array(complete))
    means = np.exp(values.mean(axis=0))
    return means[:, 0], means[:, 1], len(complete)


def settings_from_flags():
    """Return the study settings from the flags.

    Raises:
        ValueError: for a list flag that does not parse.
    """
    def integers(name, values):
        try:
            numbers = [int(value) for value in values]
        except ValueError:
            numbers = []
        if not numbers:
            raise ValueError(
                f"Invalid --{name}={','.join(values)}: expected integers "
                "separated by commas, such as 32,512."
            )
        return numbers

    for name in FLAGS.policies:
        if name not in batch_size_policies.POLICY_NAMES:
            raise ValueError(
                f"Invalid policy {name!r} in --policies: expected some of "
                f"{', '.join(batch_size_policies.POLICY_NAMES)}."
            )
    return {
        "epochs": FLAGS.epochs,
        "seeds": integers("seeds", FLAGS.seeds),
        "fixed_sizes": integers("fixed_sizes", FLAGS.fixed_sizes),
        "schedules": list(FLAGS.schedules),
        "policies": list(FLAGS.policies),
        "learning_rate": FLAGS.learning_rate,
        "fisher_interval": FLAGS.fisher_interval,
        "min_epochs_per_size": FLAGS.min_epochs_per_size,
        "norm_test_theta": FLAGS.norm_test_theta,
        "measure_first_batch_size": FLAGS.measure_first_batch_size,
        "noise_scale_multiplier": FLAGS.noise_scale_multiplier,
    }


# Prefix of the temporary run folder of `warm_up`.
WARM_UP_PREFIX = "warm_up_"


def remove_stale_warm_ups(output_dir):
    """Delete the warm-up folders that a killed study left in `output_dir`.

    The study holds the folder's lock, so no other warm-up is running.

    Raises:
        ValueError: for a warm-up folder with files that a run does not
            write (see `clear_unfinished`).
    """
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(WARM_UP_PREFIX) and os.path.isdir(path):
            clear_unfinished(path)


def warm_up(settings, output_dir, splits):
    """Train one throw-away epoch, so that TensorFlow's one-time start-up
    cost does not land in the wall time of the study's first run."""
    remove_stale_warm_ups(output_dir)
    folder = tempfile.mkdtemp(prefix=WARM_UP_PREFIX, dir=output_dir)
    try:
        config = run.RunConfig(
            dataset=DATASET, model=MODEL, epochs=1,
            learning_rate=settings["learning_rate"],
            batch_sizes=(max(settings["fixed_sizes"]),),
            fisher_interval=settings["fisher_interval"], output_dir=folder,
        )
        run.train(config, splits=splits)
    finally:
        shutil.rmtree(folder)


def check_settings(settings, output_dir):
    """Check the runs of `settings` before anything trains or is written.

    Raises:
        ValueError: for an invalid schedule, a batch size larger than the
            training set, or a first size of the measure policy outside
            the fixed sizes' range.
    """
    first_size = settings["measure_first_batch_size"]
    low, high = min(settings["fixed_sizes"]), max(settings["fixed_sizes"])
    if first_size and "measure" in settings["policies"] and not (
        low <= first_size <= high
    ):
        raise ValueError(
            f"Invalid --measure_first_batch_size={first_size}: the measure "
            f"policy chooses sizes from {low} to {high}, the range of "
            f"--fixed_sizes. Set it within that range, or to 0 for "
            f"{high}."
        )
    grid = baseline_grid(settings)
    specs = study_lib.expand(study_lib.Study("adaptive", (grid,)), output_dir)
    study_lib.check_batch_sizes(specs, "--fixed_sizes", "--schedules")


def run_study(settings, output_dir, warm_up_first=True):
    """Train the study's runs and write its table, verdict and figure.

    Args:
        settings: the dict of `settings_from_flags`.
        output_dir: folder of the run folders and results.
        warm_up_first: train a throw-away epoch first (see `warm_up`).

    Returns:
        The verdict lines.
    """
    from tf_fisher import data

    splits = data.load_dataset(DATASET)
    if warm_up_first:
        warm_up(settings, output_dir, splits)
    baselines, grid_folder = run_baselines(settings, output_dir, splits)
    best = best_fixed(baselines)
    logging.info("Best fixed batch size: %s; it is the measure policy's "
                 "beacon", best.name)
    policies = run_policies(settings, output_dir, grid_folder, best, splits)
    configurations = baselines + policies
    rows = table_rows(configurations, best)
    write_table(rows, best, output_dir)
    lines = verdict_lines(rows, best)
    with open(os.path.join(output_dir, "adaptive_verdict.md"), "w") as file:
        file.write("\n".join(lines) + "\n")
    plot_trajectories(
        configurations, os.path.join(output_dir, "adaptive_trajectories.png")
    )
    return lines


def main(argv):
    if not cli.check_arguments(
        argv, 0, "python -m experiments.adaptive_study [flags]"
    ):
        return 2
    try:
        settings = settings_from_flags()
        run.check_folder_path(FLAGS.output_dir)
        check_settings(settings, FLAGS.output_dir)
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        with run.folder_lock(FLAGS.output_dir):
            lines = run_study(settings, FLAGS.output_dir)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not run.is_write_failure(error, FLAGS.output_dir):
            raise
        print(
            f"Error: the study could not write its records in "
            f"{FLAGS.output_dir}: {error}. The finished runs are kept. Free "
            "space, then run the same command again.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "Interrupted. The finished runs are kept; run the same command "
            "again to train the rest.",
            file=sys.stderr,
        )
        return 130
    for line in lines:
        logging.info("%s", line)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
