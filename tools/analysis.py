"""Tables, tests and rankings of a sweep's runs, as in Liao et al. 2020.

The studies are those of Z. Liao, T. Drummond, I. Reid and G. Carneiro,
"Approximate Fisher Information Matrix to Characterise the Training of Deep
Neural Networks", IEEE TPAMI 42(1), 2020. This module computes:

* final errors and measures per learning rate x batch size, with the five
  lowest test errors marked;
* the best fixed-batch "beacon" against the best dynamic and multi-step
  schedules, with two-sample t-tests;
* the runs nearest a reference in (log C̄_K, log L_K), and how early the
  measures rank the runs.

All functions take the DataFrames of `tools.runs` and the configuration
summary of `summarise`. A configuration is one schedule at one learning
rate in one group; its seeds are averaged. Standard deviations are sample
standard deviations (ddof=1) over seeds.
"""

import math

import numpy as np
import pandas as pd
from scipy import spatial
from scipy import stats

from tools import runs as runs_lib

# Configuration keys: the runs with equal keys differ only in the seed.
CONFIG_KEYS = ("group", "kind", "schedule", "batch_size", "learning_rate")

# Per-run values that `summarise` averages over seeds.
METRICS = runs_lib.FINAL_KEYS + ("wall_seconds",)

# Fractions of the epochs at which the travel history reads the measures.
TRAVEL_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8, 1.0)

# Number of configurations marked as best, and of neighbours averaged by
# the test-error contour.
TOP = 5
NEIGHBOURS = 5


def configuration_label(schedule, learning_rate):
    """Return the label of a configuration, such as "s32-lr0.1"."""
    return f"{schedule}-lr{learning_rate:g}"


def summarise(runs, top=TOP):
    """Return one row per configuration with statistics over its seeds.

    Args:
        runs: DataFrame from `tools.runs.load_runs`.
        top: number of fixed-batch configurations per group to mark.

    Returns:
        A DataFrame with `CONFIG_KEYS`, `label`, `num_runs`,
        `num_diverged`, `{metric}_mean` and `{metric}_std` for each of
        `METRICS` (NaN values, such as those of a diverged run, are left
        out of the mean), and `rank` / `top` from `rank_configurations`.
    """
    keys = list(CONFIG_KEYS)
    grouped = runs.groupby(keys, dropna=False, sort=True)
    frame = grouped.agg(
        num_runs=("seed", "size"), num_diverged=("diverged", "sum")
    )
    for metric in METRICS:
        frame[f"{metric}_mean"] = grouped[metric].mean()
        frame[f"{metric}_std"] = grouped[metric].std(ddof=1)
    frame = frame.reset_index()
    frame["num_diverged"] = frame["num_diverged"].astype(int)
    frame.insert(
        len(keys),
        "label",
        [
            configuration_label(schedule, rate)
            for schedule, rate in zip(frame["schedule"], frame["learning_rate"])
        ],
    )
    return rank_configurations(frame, top)


def rank_configurations(configs, top=TOP):
    """Add `rank` (1 = lowest mean test error) and `top` (rank <= top).

    Only fixed-batch configurations without a diverged run and with a
    finite mean test error are ranked, per group; the others get rank NaN.
    Ties are broken by the standard deviation, then the train error.
    """
    configs = configs.copy()
    configs["rank"] = math.nan
    eligible = (
        (configs["kind"] == runs_lib.FIXED)
        & (configs["num_diverged"] == 0)
        & np.isfinite(configs["test_error_mean"])
    )
    for _, members in configs[eligible].groupby("group"):
        order = members.sort_values(
            ["test_error_mean", "test_error_std", "train_error_mean"],
            na_position="last",
        ).index
        configs.loc[order, "rank"] = np.arange(1, len(order) + 1)
    configs["top"] = configs["rank"] <= top
    return configs


def format_cell(mean, std, num_diverged=0, num_runs=1, percent=False,
                marked=False, markdown=True, expected_runs=None):
    """Return "mean ± std" for a table cell.

    Errors (`percent`) are shown in percent with two decimals, measures with
    four significant digits. One seed shows the mean alone. A marked cell is
    bold in Markdown and ends in " *" otherwise; a configuration with
    diverged runs ends in " (k/n diverged)", and one with fewer runs than
    `expected_runs`, as a sweep still running leaves it, in
    " (n of m seeds)".
    """
    if not np.isfinite(mean):
        text = "nan"
    elif percent:
        text = f"{100 * mean:.2f}"
        if np.isfinite(std):
            text += f" ± {100 * std:.2f}"
    else:
        text = f"{mean:.4g}"
        if np.isfinite(std):
            text += f" ± {std:.4g}"
    if marked:
        text = f"**{text}**" if markdown else f"{text} *"
    if num_diverged:
        text += f" ({num_diverged}/{num_runs} diverged)"
    if expected_runs is not None and num_runs < expected_runs:
        text += f" ({num_runs} of {expected_runs} seeds)"
    return text


def grid_table(configs, group, metric, markdown=True):
    """Return a learning rate x batch size table of one metric, as text.

    Args:
        configs: DataFrame from `summarise`.
        group: the group to tabulate.
        metric: one of `METRICS`; errors are shown in percent.
        markdown: mark the top configurations in bold (else with " *").

    Returns:
        A DataFrame indexed by learning rate with one column per batch
        size, holding `format_cell` strings; empty cells are "".
    """
    fixed = configs[
        (configs["group"] == group) & (configs["kind"] == runs_lib.FIXED)
    ]
    percent = metric.endswith("error")
    expected_runs = configs[configs["group"] == group]["num_runs"].max()
    cells = {}
    for row in fixed.itertuples(index=False):
        cells[(row.learning_rate, int(row.batch_size))] = format_cell(
            getattr(row, f"{metric}_mean"),
            getattr(row, f"{metric}_std"),
            row.num_diverged,
            row.num_runs,
            percent=percent,
            marked=bool(row.top),
            markdown=markdown,
            expected_runs=expected_runs,
        )
    rates = sorted({rate for rate, _ in cells})
    sizes = sorted({size for _, size in cells})
    table = pd.DataFrame(
        [[cells.get((rate, size), "") for size in sizes] for rate in rates],
        index=pd.Index([f"{rate:g}" for rate in rates], name="lr \\ B"),
        columns=[str(size) for size in sizes],
    )
    return table


def schedule_table(configs, group, markdown=True):
    """Return the dynamic and multi-step schedules of a group, as text.

    One row per schedule and learning rate, with the final train and test
    error, C̄_K, L_K and wall time (mean ± std over seeds). The lowest test
    error of each kind is marked. Empty if the group has no schedule.
    """
    members = configs[
        (configs["group"] == group) & (configs["kind"] != runs_lib.FIXED)
    ].sort_values(["kind", "schedule", "learning_rate"])
    expected_runs = configs[configs["group"] == group]["num_runs"].max()
    best = set()
    for _, kind_rows in members.groupby("kind"):
        finite = kind_rows[np.isfinite(kind_rows["test_error_mean"])]
        if len(finite):
            best.add(finite["test_error_mean"].idxmin())
    rows = []
    for index, row in members.iterrows():
        marked = index in best
        cells = {"schedule": row["schedule"], "kind": row["kind"],
                 "lr": f"{row['learning_rate']:g}"}
        for metric, title in _METRIC_TITLES.items():
            cells[title] = format_cell(
                row[f"{metric}_mean"], row[f"{metric}_std"],
                row["num_diverged"] if metric == "test_error" else 0,
                row["num_runs"], percent=metric.endswith("error"),
                marked=marked and metric == "test_error", markdown=markdown,
                expected_runs=expected_runs,
            )
        rows.append(cells)
    return pd.DataFrame(rows)


_METRIC_TITLES = {
    "train_error": "train error (%)",
    "test_error": "test error (%)",
    "mean_condition_number": "C̄_K",
    "cumulative_fisher_energy": "L_K",
    "wall_seconds": "wall time (s)",
}


def beacon_learning_rate(configs, group):
    """Return the learning rate of a group's schedules, or None.

    The fixed-batch runs at the schedules' learning rate are their beacons.
    With schedules at several rates, the most common one is returned.
    """
    rates = configs.loc[
        (configs["group"] == group) & (configs["kind"] != runs_lib.FIXED),
        "learning_rate",
    ]
    if rates.empty:
        return None
    return float(rates.mode().min())


def best_configuration(configs, group, kind, learning_rate=None):
    """Return the row (a Series) of the lowest mean test error of a kind.

    Configurations with a diverged run are left out. Returns None if no
    configuration qualifies.
    """
    members = configs[
        (configs["group"] == group)
        & (configs["kind"] == kind)
        & (configs["num_diverged"] == 0)
        & np.isfinite(configs["test_error_mean"])
    ]
    if learning_rate is not None:
        members = members[np.isclose(members["learning_rate"], learning_rate)]
    if members.empty:
        return None
    return members.loc[members["test_error_mean"].idxmin()]


def two_sample_t_test(first, second, equal_var=False):
    """Return the two-sided p-value of a two-sample t-test, NaN if undefined.

    `equal_var=False` is Welch's test (no equal-variance assumption);
    `equal_var=True` is Student's. Fewer than two values on either side, or
    no variance on both, give NaN.
    """
    first = np.asarray(first, dtype=float)
    second = np.asarray(second, dtype=float)
    first = first[np.isfinite(first)]
    second = second[np.isfinite(second)]
    if len(first) < 2 or len(second) < 2:
        return math.nan
    if np.ptp(first) == 0 and np.ptp(second) == 0:
        return math.nan
    return float(stats.ttest_ind(first, second, equal_var=equal_var).pvalue)


def comparison_table(runs, configs, group, equal_var=False):
    """Return the best beacon, dynamic and multi-step schedule side by side.

    The beacons are the fixed-batch runs at the schedules' learning rate
    (`beacon_learning_rate`). Each row gives the best configuration of its
    kind: the test error (mean ± std over seeds, in percent), the p-value of
    a two-sample t-test of its per-seed test errors against the best
    beacon's, the p-value of dynamic against multi-step, and the mean wall
    time of one run. `equal_var=False` uses Welch's t-test.

    Returns:
        A DataFrame with one row per kind present, or None if the group has
        no schedule.
    """
    rate = beacon_learning_rate(configs, group)
    if rate is None:
        return None
    best = {
        "beacon": best_configuration(configs, group, runs_lib.FIXED, rate),
        "dynamic": best_configuration(configs, group, runs_lib.DYNAMIC),
        "multi-step": best_configuration(
            configs, group, runs_lib.MULTI_STEP
        ),
    }
    errors = {
        name: _seed_errors(runs, row) for name, row in best.items()
        if row is not None
    }
    rows = []
    for name, row in best.items():
        if row is None:
            continue
        rows.append(
            {
                "model": name,
                "name": row["label"],
                "test_error_mean": row["test_error_mean"],
                "test_error_std": row["test_error_std"],
                "test error (%)": format_cell(
                    row["test_error_mean"], row["test_error_std"],
                    percent=True,
                ),
                "p vs beacon": _p_value(errors, name, "beacon", equal_var),
                "p dynamic vs multi-step": (
                    _p_value(errors, "dynamic", "multi-step", equal_var)
                    if name == "multi-step" else math.nan
                ),
                "wall time (s)": row["wall_seconds_mean"],
                "num_runs": int(row["num_runs"]),
            }
        )
    return pd.DataFrame(rows)


def _seed_errors(runs, config_row):
    members = runs[
        (runs["group"] == config_row["group"])
        & (runs["schedule"] == config_row["schedule"])
        & np.isclose(runs["learning_rate"], config_row["learning_rate"])
    ]
    return members["test_error"].to_numpy()


def _p_value(errors, name, other, equal_var):
    if name == other or name not in errors or other not in errors:
        return math.nan
    return two_sample_t_test(errors[name], errors[other], equal_var)


def normalised_log_points(condition, energy):
    """Return (log10 C̄_K, log10 L_K) scaled to [0, 1] per axis.

    Args:
        condition: C̄_K values, shape [n], positive.
        energy: L_K values, shape [n], positive.

    Returns:
        (points, (low, span)): points of shape [n, 2]; `low` and `span`
        (shape [2]) map log10 values to the unit square. An axis on which
        all values are equal gets span 1.
    """
    logs = np.column_stack([np.log10(condition), np.log10(energy)])
    low = logs.min(axis=0)
    span = logs.max(axis=0) - low
    span = np.where(span > 0, span, 1.0)
    return (logs - low) / span, (low, span)


def knn_contour(condition, energy, values, k=NEIGHBOURS, resolution=100,
                margin=0.05):
    """Interpolate `values` over the (log C̄_K, log L_K) plane.

    Each grid point gets the mean of the values of its `k` nearest points
    (all points if fewer) in normalised log space (`normalised_log_points`).
    The grid covers the points' range plus `margin` of it on each side.

    Args:
        condition: C̄_K of each point, shape [n].
        energy: L_K of each point, shape [n].
        values: the value of each point (a test error), shape [n].
        k: neighbours averaged per grid point.
        resolution: grid points per axis.
        margin: extra range on each side, as a fraction of the range.

    Returns:
        (grid_condition, grid_energy, grid_values), each of shape
        [resolution, resolution]; the first two are C̄_K and L_K values
        (not logarithms), ready for a contour plot on log axes.
    """
    points, (low, span) = normalised_log_points(condition, energy)
    axis = np.linspace(-margin, 1 + margin, resolution)
    grid_x, grid_y = np.meshgrid(axis, axis)
    queries = np.column_stack([grid_x.ravel(), grid_y.ravel()])
    neighbours = min(k, len(points))
    _, indices = spatial.cKDTree(points).query(queries, k=neighbours)
    indices = np.reshape(indices, (len(queries), neighbours))
    grid_values = np.asarray(values, dtype=float)[indices].mean(axis=1)
    return (
        10 ** (low[0] + span[0] * grid_x),
        10 ** (low[1] + span[1] * grid_y),
        grid_values.reshape(grid_x.shape),
    )


def measure_points(configs, group, kinds=(runs_lib.FIXED,)):
    """Return a group's configurations with finite, positive C̄_K and L_K."""
    members = configs[
        (configs["group"] == group) & configs["kind"].isin(kinds)
    ]
    condition = members["mean_condition_number_mean"]
    energy = members["cumulative_fisher_energy_mean"]
    usable = (
        np.isfinite(condition) & np.isfinite(energy)
        & (condition > 0) & (energy > 0)
    )
    return members[usable]


def nearest_configurations(configs, group, reference, k=5):
    """Return the configurations nearest a reference in (log C̄_K, log L_K).

    Distances are Euclidean in the normalised log space of all the group's
    configurations (fixed and scheduled) with finite measures.

    Args:
        configs: DataFrame from `summarise`.
        group: the group.
        reference: the reference's label, such as "s32-lr0.1".
        k: number of neighbours returned.

    Returns:
        A DataFrame of the `k` nearest configurations, nearest first, with
        `label`, `distance`, the measures, the test error and the numbers
        of diverged and of all runs.

    Raises:
        ValueError: if the reference is not a configuration of the group,
            or has no finite measures.
    """
    points = measure_points(
        configs, group,
        (runs_lib.FIXED, runs_lib.DYNAMIC, runs_lib.MULTI_STEP),
    )
    members = configs[configs["group"] == group]
    if reference in set(members["label"]) and reference not in set(
        points["label"]
    ):
        raise ValueError(
            f"Reference configuration {reference!r} of group {group!r} has "
            "no finite, positive C̄_K and L_K (a run diverged before its "
            "first probe, or its measures are NaN), so it has no place in "
            "the plane. Pick another, such as "
            f"{', '.join(points['label'].head(4))}."
        )
    if reference not in set(points["label"]):
        raise ValueError(
            f"Unknown reference configuration {reference!r} in group "
            f"{group!r}. Expected a label such as "
            f"{', '.join(points['label'].head(4))}."
        )
    scaled, _ = normalised_log_points(
        points["mean_condition_number_mean"].to_numpy(),
        points["cumulative_fisher_energy_mean"].to_numpy(),
    )
    position = np.flatnonzero(points["label"].to_numpy() == reference)[0]
    distance = np.linalg.norm(scaled - scaled[position], axis=1)
    result = points.assign(distance=distance).drop(points.index[position])
    columns = [
        "label", "distance", "mean_condition_number_mean",
        "cumulative_fisher_energy_mean", "test_error_mean", "test_error_std",
        "num_diverged", "num_runs",
    ]
    return result.sort_values("distance")[columns].head(k).reset_index(
        drop=True
    )


def epoch_means(epochs, runs, group):
    """Return per-configuration means over seeds of each epoch's values.

    Returns:
        A DataFrame with `label`, `epoch`, `mean_condition_number`,
        `cumulative_fisher_energy`, `train_error` and `test_error`, for the
        group's fixed-batch configurations without a diverged run.
    """
    members = runs[(runs["group"] == group) & (runs["kind"] == runs_lib.FIXED)]
    labels = {
        row.run: configuration_label(row.schedule, row.learning_rate)
        for row in members.itertuples()
    }
    diverged = {
        labels[name] for name in members.loc[members["diverged"], "run"]
    }
    rows = epochs[epochs["run"].isin(labels)].copy()
    rows["label"] = rows["run"].map(labels)
    rows = rows[~rows["label"].isin(diverged)]
    columns = [
        "mean_condition_number", "cumulative_fisher_energy", "train_error",
        "test_error",
    ]
    return rows.groupby(["label", "epoch"])[columns].mean().reset_index()


def early_ranking(epochs, runs, configs, group, top=TOP):
    """Return, per epoch, how well that epoch's values predict the final
    test error of the group's fixed-batch configurations.

    At epoch e, each configuration's (C̄_K, L_K) is placed in the
    normalised log space of all configurations at epoch e. Its distance to
    the optimum region is the distance to the centroid of the `top`
    configurations with the lowest final test error among the others
    (leaving the configuration itself out, so that it cannot define its own
    region). The Spearman rank correlation of these distances with the
    final test errors measures how well the position at epoch e ranks the
    configurations. A large positive value means that distant
    configurations end with high errors, so they can be stopped early.

    Returns:
        A DataFrame with one row per epoch: `epoch`, `num_configurations`,
        `distance_rho` and `distance_p` (Spearman's rho and its p-value),
        `test_error_rho` (rho of the test error at epoch e with the final
        one, the ranking without the measures), and `condition_rho` and
        `energy_rho` (rho of C̄_K and L_K at epoch e with their final
        values: how stable the relative positions are).
    """
    means = epoch_means(epochs, runs, group)
    final = means.sort_values("epoch").groupby("label").last()
    ranked = configs[(configs["group"] == group) & configs["rank"].notna()]
    final_error = ranked.set_index("label")["test_error_mean"]
    rows = []
    for epoch, at_epoch in means.groupby("epoch"):
        at_epoch = at_epoch.set_index("label")
        at_epoch = at_epoch[
            at_epoch.index.isin(final_error.index)
            & (at_epoch["mean_condition_number"] > 0)
            & (at_epoch["cumulative_fisher_energy"] > 0)
        ]
        rows.append(
            _rank_epoch(int(epoch), at_epoch, final, final_error, top)
        )
    return pd.DataFrame(rows, columns=_RANKING_COLUMNS)


_RANKING_COLUMNS = (
    "epoch", "num_configurations", "distance_rho", "distance_p",
    "test_error_rho", "condition_rho", "energy_rho",
)


def _rank_epoch(epoch, at_epoch, final, final_error, top):
    labels = at_epoch.index.to_numpy()
    row = dict.fromkeys(_RANKING_COLUMNS, math.nan)
    row.update(epoch=epoch, num_configurations=len(labels))
    if len(labels) < 3:
        return row
    target = final_error.loc[labels].to_numpy()
    distance = optimum_distances(
        at_epoch["mean_condition_number"].to_numpy(),
        at_epoch["cumulative_fisher_energy"].to_numpy(),
        target,
        top,
    )
    row["distance_rho"], row["distance_p"] = _spearman(distance, target)
    row["test_error_rho"], _ = _spearman(
        at_epoch["test_error"].to_numpy(), target
    )
    for column, key in (
        ("condition_rho", "mean_condition_number"),
        ("energy_rho", "cumulative_fisher_energy"),
    ):
        row[column], _ = _spearman(
            at_epoch[key].to_numpy(), final.loc[labels, key].to_numpy()
        )
    return row


def optimum_distances(condition, energy, final_error, top=TOP):
    """Return each point's distance to the optimum region of the others.

    Args:
        condition: C̄_K of each configuration, shape [n].
        energy: L_K of each configuration, shape [n].
        final_error: final test error of each configuration, shape [n].
        top: size of the optimum region.

    Returns:
        Distances of shape [n]: for point i, the Euclidean distance in
        normalised log space to the centroid of the `top` points other than
        i with the lowest final error.
    """
    points, _ = normalised_log_points(condition, energy)
    order = np.argsort(final_error, kind="stable")
    distances = np.empty(len(points))
    for i in range(len(points)):
        others = [j for j in order if j != i][:top]
        centroid = points[others].mean(axis=0)
        distances[i] = np.linalg.norm(points[i] - centroid)
    return distances


def _spearman(first, second):
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return math.nan, math.nan
    result = stats.spearmanr(first, second)
    return float(result.statistic), float(result.pvalue)


def travel_epochs(num_epochs, fractions=TRAVEL_FRACTIONS):
    """Return the 1-based epochs at `fractions` of `num_epochs` (rounded
    up, at least 1), e.g. [1, 2, 4, 6, 8, 10] for 10 epochs."""
    return [
        min(num_epochs, max(1, math.ceil(fraction * num_epochs - 1e-9)))
        for fraction in fractions
    ]


def travel_history(epochs, runs, group, learning_rate):
    """Return the (C̄_K, L_K) travel of schedules and their beacons.

    For every configuration of the group at `learning_rate` (fixed-batch
    beacons and schedules alike), the measures averaged over seeds at
    `TRAVEL_FRACTIONS` of the epochs.

    Returns:
        A DataFrame with `label`, `kind`, `schedule`, `batch_size`,
        `fraction`, `epoch`, `mean_condition_number` and
        `cumulative_fisher_energy`, sorted by label and fraction.
    """
    members = runs[
        (runs["group"] == group)
        & np.isclose(runs["learning_rate"], learning_rate)
    ]
    rows = []
    for schedule, config_runs in members.groupby("schedule"):
        first = config_runs.iloc[0]
        history = epochs[epochs["run"].isin(config_runs["run"])]
        per_epoch = history.groupby("epoch")[
            ["mean_condition_number", "cumulative_fisher_energy"]
        ].mean()
        num_epochs = int(first["epochs"])
        for fraction, epoch in zip(
            TRAVEL_FRACTIONS, travel_epochs(num_epochs)
        ):
            if epoch not in per_epoch.index:
                continue
            rows.append(
                {
                    "label": configuration_label(schedule, learning_rate),
                    "kind": first["kind"],
                    "schedule": schedule,
                    "batch_size": first["batch_size"],
                    "fraction": fraction,
                    "epoch": epoch,
                    **per_epoch.loc[epoch].to_dict(),
                }
            )
    columns = [
        "label", "kind", "schedule", "batch_size", "fraction", "epoch",
        "mean_condition_number", "cumulative_fisher_energy",
    ]
    return pd.DataFrame(rows, columns=columns)


if __name__ == "__main__":
    import tools

    raise SystemExit(tools.print_not_a_command("tools.analysis"))
