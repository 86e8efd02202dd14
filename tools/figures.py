"""Figures of a sweep in the style of Liao et al. 2020, as PNG and PDF.

The figures follow Z. Liao, T. Drummond, I. Reid and G. Carneiro,
"Approximate Fisher Information Matrix to Characterise the Training of Deep
Neural Networks", IEEE TPAMI 42(1), 2020:

* test error against batch size;
* the "optimum region" plot of final C̄_K against L_K over a test-error
  contour;
* C̄_K and L_K against epoch, sampled iteration and cumulative learning
  rate;
* the travel history of dynamic schedules over their beacons;
* train and test error curves.

Each function saves `{stem}.png` and `{stem}.pdf` and returns the two
paths.
"""

import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

from tools import analysis
from tools import runs as runs_lib

FORMATS = ("png", "pdf")
DPI = 120


def save(figure, stem):
    """Save `figure` as `{stem}.png` and `{stem}.pdf`, close it, and return
    the paths."""
    directory = os.path.dirname(stem)
    if directory:
        os.makedirs(directory, exist_ok=True)
    paths = []
    for extension in FORMATS:
        path = f"{stem}.{extension}"
        figure.savefig(path, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    plt.close(figure)
    return paths


def _colours(count):
    palette = plt.get_cmap("viridis" if count > 10 else "tab10")
    if count > 10:
        return [palette(i / max(1, count - 1)) for i in range(count)]
    return [palette(i) for i in range(count)]


def _fixed(configs, group):
    return configs[
        (configs["group"] == group) & (configs["kind"] == runs_lib.FIXED)
    ]


def error_vs_batch_size(configs, group, stem):
    """Plot the final test error against the batch size, one line per
    learning rate, with ±1 std error bars, the top five starred and
    configurations with a diverged run crossed out."""
    fixed = _fixed(configs, group)
    figure, axes = plt.subplots(figsize=(6, 4))
    rates = sorted(fixed["learning_rate"].unique())
    for colour, rate in zip(_colours(len(rates)), rates):
        line = fixed[np.isclose(fixed["learning_rate"], rate)].sort_values(
            "batch_size"
        )
        axes.errorbar(
            line["batch_size"], 100 * line["test_error_mean"],
            yerr=100 * line["test_error_std"].fillna(0), marker="o",
            color=colour, capsize=3, label=f"lr {rate:g}",
        )
    best = fixed[fixed["top"]]
    axes.scatter(
        best["batch_size"], 100 * best["test_error_mean"], marker="*",
        s=200, facecolor="none", edgecolor="red", zorder=5, label="top 5",
    )
    diverged = fixed[fixed["num_diverged"] > 0]
    if len(diverged):
        axes.scatter(
            diverged["batch_size"], 100 * diverged["test_error_mean"],
            marker="x", s=90, color="red", zorder=6, label="a run diverged",
        )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("batch size B")
    axes.set_ylabel("final test error (%)")
    axes.set_title(f"{group}: test error")
    axes.legend(fontsize="small")
    return save(figure, stem)


def region_points(configs, group, neighbours=analysis.NEIGHBOURS):
    """Split the fixed-batch configurations of a group for the
    optimum-region figure.

    Configurations with a diverged run are left out of the figure: their
    test error is that of a broken network, and their C̄_K and L_K stop
    where the run did, often decades away from the others, or are NaN.
    With `neighbours` or fewer configurations left, every grid point of the
    contour would average all of them, one flat shade, so there is none.

    Returns:
        (kept, diverged_labels, notes): the configurations to plot, the
        labels of those left out, and lines to print on the figure.
    """
    points = analysis.measure_points(configs, group)
    kept = points[points["num_diverged"] == 0]
    members = _fixed(configs, group)
    diverged_labels = list(members[members["num_diverged"] > 0]["label"])
    notes = []
    if diverged_labels:
        notes.append(
            "left out, a run diverged: " + ", ".join(diverged_labels)
        )
    if len(kept) <= neighbours:
        notes.append(
            f"no test-error contour: {len(kept)} configurations, and the "
            f"contour averages the {neighbours} nearest"
        )
    return kept, diverged_labels, notes


def optimum_region(configs, group, stem, neighbours=analysis.NEIGHBOURS):
    """Plot final C̄_K against L_K on log axes over a test-error contour.

    Each point is a fixed-batch configuration (mean over seeds), and the
    points of one learning rate are joined in order of batch size. The
    contour is the mean test error of the `neighbours` nearest
    configurations in normalised log space (`tools.analysis.knn_contour`),
    drawn when there are more than `neighbours` configurations. The top
    five are starred and numbered by rank. Configurations with a diverged
    run are left out and named on the figure (`region_points`).
    """
    points, _, notes = region_points(configs, group, neighbours)
    figure, axes = plt.subplots(figsize=(7, 5.5))
    if len(points) > neighbours:
        grid_c, grid_l, grid_error = analysis.knn_contour(
            points["mean_condition_number_mean"].to_numpy(),
            points["cumulative_fisher_energy_mean"].to_numpy(),
            100 * points["test_error_mean"].to_numpy(),
            k=neighbours,
        )
        filled = axes.contourf(
            grid_c, grid_l, grid_error, levels=15, cmap="Greys", alpha=0.6
        )
        figure.colorbar(
            filled, ax=axes,
            label=f"test error (%), mean of {neighbours} nearest",
        )
    if notes:
        axes.text(
            0.02, 0.02, "\n".join(notes), transform=axes.transAxes,
            fontsize=7, color="dimgray",
        )
    rates = sorted(points["learning_rate"].unique())
    for colour, rate in zip(_colours(len(rates)), rates):
        line = points[np.isclose(points["learning_rate"], rate)].sort_values(
            "batch_size"
        )
        axes.plot(
            line["mean_condition_number_mean"],
            line["cumulative_fisher_energy_mean"],
            marker="o", color=colour, label=f"lr {rate:g}",
        )
        for row in line.itertuples():
            axes.annotate(
                f"{int(row.batch_size)}",
                (row.mean_condition_number_mean,
                 row.cumulative_fisher_energy_mean),
                textcoords="offset points", xytext=(4, 4), fontsize=7,
            )
    _mark_top(axes, points)
    _log_axes(axes)
    axes.set_xlabel("final C̄_K")
    axes.set_ylabel("final L_K")
    axes.set_title(f"{group}: optimum region (numbers: batch size)")
    axes.legend(fontsize="small", loc="best")
    return save(figure, stem)


def _log_axes(axes):
    """Put both axes on a log scale, with plain labels on an axis that spans
    less than a decade.

    Matplotlib labels every minor tick of such an axis in scientific
    notation, and on the C̄_K axis ("1.4×10^4", "1.5×10^4", ...) the labels
    run into each other.
    """
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.autoscale_view()
    for axis in (axes.xaxis, axes.yaxis):
        low, high = axis.get_view_interval()
        if 0 < low and high < 10 * low:
            axis.set_major_locator(ticker.MaxNLocator(nbins=5))
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())


def _mark_top(axes, points):
    best = points[points["top"]].sort_values("rank")
    axes.scatter(
        best["mean_condition_number_mean"],
        best["cumulative_fisher_energy_mean"], marker="*", s=260,
        facecolor="none", edgecolor="red", zorder=5, label="top 5",
    )
    for row in best.itertuples():
        axes.annotate(
            f"#{int(row.rank)}",
            (row.mean_condition_number_mean,
             row.cumulative_fisher_energy_mean),
            textcoords="offset points", xytext=(-14, -12), fontsize=8,
            color="red",
        )


def measures_over_time(epochs, samples, runs, group, learning_rate, stem):
    """Plot C̄_K and L_K of the fixed-batch runs at one learning rate
    against epoch, sampled iteration k and cumulative learning rate
    sum_k alpha_k. Each batch size is one line, from its first seed."""
    members = runs[
        (runs["group"] == group)
        & (runs["kind"] == runs_lib.FIXED)
        & np.isclose(runs["learning_rate"], learning_rate)
    ].sort_values(["batch_size", "seed"])
    members = members.groupby("batch_size").head(1)
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    colours = _colours(len(members))
    for colour, row in zip(colours, members.itertuples()):
        label = f"B={int(row.batch_size)}"
        history = epochs[epochs["run"] == row.run]
        sampled = samples[samples["run"] == row.run]
        for line, metric in enumerate(
            ("mean_condition_number", "cumulative_fisher_energy")
        ):
            axes[line, 0].plot(history["epoch"], history[metric],
                               color=colour, label=label)
            axes[line, 1].plot(sampled["sample"], sampled[metric],
                               color=colour, label=label)
            axes[line, 2].plot(sampled["cumulative_learning_rate"],
                               sampled[metric], color=colour, label=label)
    titles = ("epoch", "sampled iteration k", "cumulative learning rate")
    for column, title in enumerate(titles):
        axes[1, column].set_xlabel(title)
        for line in range(2):
            axes[line, column].set_yscale("log")
    axes[0, 0].set_ylabel("C̄_K")
    axes[1, 0].set_ylabel("L_K")
    axes[0, 0].legend(fontsize="small")
    seed = f"seed {members['seed'].iloc[0]}" if len(members) else "no runs"
    if members["seed"].nunique() > 1:
        seed = "first seed of each batch size"
    figure.suptitle(f"{group}: measures at lr {learning_rate:g} ({seed})")
    figure.tight_layout()
    return save(figure, stem)


def travel_history(epochs, runs, group, learning_rate, stem):
    """Plot the (C̄_K, L_K) travel of the schedules over their beacons.

    Each configuration at `learning_rate` is a line through its values at
    5, 20, 40, 60, 80 and 100% of the epochs (mean over seeds). Beacons
    (fixed batch sizes) are dotted and labelled with their batch size at
    the 5% point; schedules are solid, with markers.
    """
    history = analysis.travel_history(epochs, runs, group, learning_rate)
    figure, axes = plt.subplots(figsize=(7, 5.5))
    beacons = history[history["kind"] == runs_lib.FIXED]
    for label, line in beacons.groupby("label"):
        axes.plot(
            line["mean_condition_number"], line["cumulative_fisher_energy"],
            linestyle=":", color="grey",
        )
        start = line.iloc[0]
        axes.annotate(
            f"s{int(start['batch_size'])}",
            (start["mean_condition_number"],
             start["cumulative_fisher_energy"]),
            fontsize=8, color="grey",
        )
    scheduled = history[history["kind"] != runs_lib.FIXED]
    labels = sorted(scheduled["label"].unique())
    for colour, label in zip(_colours(len(labels)), labels):
        line = scheduled[scheduled["label"] == label]
        style = "--" if line["kind"].iloc[0] == runs_lib.MULTI_STEP else "-"
        axes.plot(
            line["mean_condition_number"], line["cumulative_fisher_energy"],
            linestyle=style, marker="o", color=colour,
            label=line["schedule"].iloc[0],
        )
    _log_axes(axes)
    axes.set_xlabel("C̄_K")
    axes.set_ylabel("L_K")
    axes.set_title(
        f"{group}: travel at 5, 20, 40, 60, 80, 100% of the epochs "
        f"(lr {learning_rate:g}; dotted: beacons)", fontsize=9,
    )
    if labels:
        axes.legend(fontsize="small")
    return save(figure, stem)


def error_curves(epochs, runs, group, learning_rate, stem):
    """Plot train and test error against epoch for the configurations at
    `learning_rate`, mean over seeds; fixed batch sizes dotted."""
    members = runs[
        (runs["group"] == group)
        & np.isclose(runs["learning_rate"], learning_rate)
    ]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    schedules = sorted(members["schedule"].unique(), key=_schedule_order)
    for colour, schedule in zip(_colours(len(schedules)), schedules):
        config_runs = members[members["schedule"] == schedule]
        history = epochs[epochs["run"].isin(config_runs["run"])]
        mean = history.groupby("epoch")[["train_error", "test_error"]].mean()
        style = ":" if config_runs["kind"].iloc[0] == runs_lib.FIXED else "-"
        for column, metric in enumerate(("train_error", "test_error")):
            axes[0, column].plot(
                mean.index, 100 * mean[metric], linestyle=style,
                color=colour, label=schedule,
            )
    for column, title in enumerate(("train error (%)", "test error (%)")):
        axes[0, column].set_xlabel("epoch")
        axes[0, column].set_ylabel(title)
    axes[0, 1].legend(fontsize="x-small", ncol=2)
    figure.suptitle(f"{group}: error curves at lr {learning_rate:g}")
    figure.tight_layout()
    return save(figure, stem)


def _schedule_order(schedule):
    """Sort fixed batch sizes by size, then the schedules by name."""
    digits = schedule[1:]
    return (0, int(digits), "") if digits.isdigit() else (1, math.inf,
                                                           schedule)


if __name__ == "__main__":
    import tools

    raise SystemExit(tools.print_not_a_command("tools.figures"))
