"""Write one Markdown page of tables and figures for a sweep's run folders.

    python -m tools.report runs/cpu
    python -m tools.report runs/cpu --output_dir=/tmp/report \\
        --reference=s32-lr0.1

A group of runs is one model on one dataset for one number of epochs. For
each group the page has these sections:

* the findings of Liao et al. 2020 checked on the numbers (`tools.claims`);
* final train and test error, C̄_K and L_K per learning rate x batch size,
  mean ± std over seeds, with the five lowest test errors in bold;
* the dynamic and multi-step schedules, and the best of each kind against
  the best beacon (Welch's t-test unless --student);
* the figures of `tools.figures`;
* the early ranking, and the configurations nearest a reference.

Tables go to `tables/` as CSV and Markdown, figures to `figures/` as PNG
and PDF, and the page to `report.md`, all under --output_dir (default
RUNS_DIR/report).
"""

import math
import os
import sys

import numpy as np
import pandas as pd
from absl import app
from absl import flags
from absl import logging

from tools import analysis
from tools import claims as claims_lib
from tools import figures
from tools import runs as runs_lib


def define_flags(flag_values=flags.FLAGS):
    """Define the command-line flags in `flag_values` and return it.

    The flags are defined only when the module runs as a program, so that
    importing it next to other programs' flags raises no duplicate-flag
    error.
    """
    flags.DEFINE_string(
        "output_dir", None,
        "Folder of the report (default: RUNS_DIR/report).",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "reference", None,
        "Configuration whose nearest neighbours in (log C̄_K, log L_K) are "
        "listed, such as s32-lr0.1 (default: each group's lowest test "
        "error).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "student", False,
        "Use Student's equal-variance t-test instead of Welch's.",
        flag_values=flag_values,
    )
    return flag_values


# Grid tables of the report: (metric, title, file name).
GRID_TABLES = (
    ("test_error", "Final test error (%)", "test_error"),
    ("train_error", "Final train error (%)", "train_error"),
    ("mean_condition_number", "Final C̄_K", "condition_number"),
    ("cumulative_fisher_energy", "Final L_K", "fisher_energy"),
)


def markdown_table(frame, index=True):
    """Return a DataFrame as a Markdown (GitHub) table.

    Floats are written with four significant digits, NaN as "".
    """
    columns = list(frame.columns)
    header = ([frame.index.name or ""] if index else []) + [
        str(column) for column in columns
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    for label, row in zip(frame.index, frame.itertuples(index=False)):
        cells = ([str(label)] if index else []) + [
            _markdown_cell(value) for value in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(value):
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _plural(count, noun):
    """Return "1 seed", "2 seeds": `count` and `noun`, plural unless 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Writer:
    """Collects the report's Markdown and writes its tables and figures."""

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.lines = []
        self.num_tables = 0
        self.num_figures = 0
        os.makedirs(os.path.join(output_dir, "tables"), exist_ok=True)
        os.makedirs(os.path.join(output_dir, "figures"), exist_ok=True)

    def text(self, *paragraphs):
        for paragraph in paragraphs:
            self.lines.append(paragraph.rstrip("\n") + "\n")

    def table(self, title, markdown_frame, csv_frame, name, index=True):
        """Add a titled table and write it as `tables/{name}.csv` and
        `tables/{name}.md`."""
        text = markdown_table(markdown_frame, index=index)
        stem = os.path.join(self.output_dir, "tables", name)
        csv_frame.to_csv(f"{stem}.csv", index=index)
        with open(f"{stem}.md", "w") as file:
            file.write(f"{title}\n\n{text}")
        self.num_tables += 1
        self.text(f"**{title}**", text)

    def figure(self, caption, paths):
        png = os.path.relpath(paths[0], self.output_dir)
        pdf = os.path.relpath(paths[1], self.output_dir)
        self.num_figures += 1
        self.text(f"![{caption}]({png})\n\n*{caption}* ([PDF]({pdf}))")

    def save(self):
        path = os.path.join(self.output_dir, "report.md")
        with open(path, "w") as file:
            file.write("\n".join(self.lines))
        return path


def write_report(root, output_dir=None, reference=None, equal_var=False):
    """Write the report of the runs below `root`; return report.md's path.

    Args:
        root: the sweep's output folder.
        output_dir: the report's folder; None uses `root/report`.
        reference: label of the configuration whose neighbours are listed,
            such as "s32-lr0.1"; None uses each group's best configuration.
        equal_var: use Student's t-test (True) or Welch's (False).

    Raises:
        ValueError: if `root` is not a folder or has no finished run, if
            `reference` is the label of no configuration, or if
            `output_dir` cannot be created; raised before anything is
            written.
    """
    runs = runs_lib.load_runs(root)
    if runs.empty:
        raise ValueError(
            f"No finished run below {root!r}: no folder there has both "
            "config.json and summary.json. Run experiments.sweep first."
        )
    output_dir = output_dir or os.path.join(root, "report")
    configs = analysis.summarise(runs)
    labels = list(configs["label"])
    if reference is not None and reference not in labels:
        raise ValueError(
            f"Unknown --reference={reference}: no group has this "
            "configuration. Pass a label such as "
            f"{', '.join(labels[:4])}."
        )
    try:
        writer = _Writer(output_dir)
    except OSError as error:
        raise ValueError(
            f"Invalid --output_dir={output_dir}: cannot create the folder "
            f"{error.filename} ({error.strerror}). Pass a folder path whose "
            "parts are folders that you can write to."
        ) from None
    epochs = runs_lib.load_epochs(root, runs)
    samples = runs_lib.load_samples(root, runs)
    _header(writer, root, runs)
    for group in sorted(runs["group"].unique()):
        _GroupSection(
            writer, group, runs, configs, epochs, samples, equal_var
        ).write(reference)
    path = writer.save()
    logging.info(
        "Wrote %s with %s (CSV and Markdown) and %s (PNG and PDF)", path,
        _plural(writer.num_tables, "table"),
        _plural(writer.num_figures, "figure"),
    )
    return path


def _header(writer, root, runs):
    writer.text(f"# Sweep report: {os.path.abspath(root)}")
    sweep = _read_sweep(root)
    if sweep.get("description"):
        writer.text(f"Study `{sweep.get('study')}`: {sweep['description']}")
    last = sweep.get("last_sweep")
    if last:
        writer.text(
            f"Last sweep: {_plural(last['trained'], 'run')} trained in "
            f"{last['wall_seconds']:.0f} s wall time with "
            f"{_plural(last['jobs'], 'job')} ({last['failed']} failed)"
            + (", then it was interrupted." if last.get("interrupted") else ".")
        )
    unfinished = runs_lib.unfinished_runs(root)
    writer.text(
        f"{_plural(len(runs), 'finished run')} "
        f"({int(runs['diverged'].sum())} diverged), "
        f"{len(unfinished)} unfinished, {runs['wall_seconds'].sum():.0f} s "
        "of training in total (sum over runs). Errors are in percent, mean "
        "± sample standard deviation over seeds; **bold** marks the five "
        "fixed-batch configurations with the lowest mean test error. "
        "\"(k/n diverged)\" counts runs whose loss or Gram trace became "
        "non-finite; configurations with a diverged run are not ranked."
    )


def _read_sweep(root):
    """Return the record of `root`/sweep.json, {} when there is none.

    Raises:
        ValueError: naming the file, if it does not hold a JSON object.
    """
    record = runs_lib.read_json_object(
        os.path.join(root, "sweep.json"),
        "The sweep writes it whole, so it was changed after the sweep. "
        "Remove it, and the next sweep on the folder writes it again.",
    )
    return record or {}


class _GroupSection:
    """The report section of one group of runs."""

    def __init__(self, writer, group, runs, configs, epochs, samples,
                 equal_var):
        self.writer = writer
        self.group = group
        self.runs = runs[runs["group"] == group]
        self.all_runs = runs
        self.configs = configs
        self.epochs = epochs
        self.samples = samples
        self.equal_var = equal_var

    def _path(self, kind, name):
        return os.path.join(
            self.writer.output_dir, kind, f"{self.group}_{name}"
        )

    def write(self, reference):
        runs = self.runs
        self.writer.text(
            f"## {self.group}",
            f"{runs['dataset'].iloc[0]}, {runs['model'].iloc[0]}, "
            f"{_plural(int(runs['epochs'].max()), 'epoch')}: "
            f"{_plural(len(runs), 'run')} "
            f"({int(runs['diverged'].sum())} diverged), "
            f"{_plural(runs['seed'].nunique(), 'seed')}, "
            f"{runs['wall_seconds'].sum():.0f} s of training.",
        )
        ranking = analysis.early_ranking(
            self.epochs, self.all_runs, self.configs, self.group
        )
        self._claims(ranking)
        self._grid_tables()
        self._schedules()
        self._figures()
        self._ranking(ranking)
        self._nearest(reference)

    def _claims(self, ranking):
        found = claims_lib.check_claims(
            self.configs, ranking, self.group, int(self.runs["epochs"].max())
        )
        frame = pd.DataFrame(
            [
                {"finding": claim.statement, "verdict": claim.verdict,
                 "evidence": claim.evidence}
                for claim in found
            ]
        )
        self.writer.table(
            "Findings of Liao et al. 2020 on these runs", frame, frame,
            f"{self.group}_claims", index=False,
        )

    def _grid_tables(self):
        fixed = self.configs[
            (self.configs["group"] == self.group)
            & (self.configs["kind"] == runs_lib.FIXED)
        ]
        if fixed.empty:
            return
        for metric, title, name in GRID_TABLES:
            self.writer.table(
                f"{title}, learning rate × batch size",
                analysis.grid_table(self.configs, self.group, metric),
                analysis.grid_table(
                    self.configs, self.group, metric, markdown=False
                ),
                f"{self.group}_{name}",
            )
        tidy = self.configs[self.configs["group"] == self.group]
        tidy.to_csv(self._path("tables", "configurations") + ".csv",
                    index=False)

    def _schedules(self):
        table = analysis.schedule_table(self.configs, self.group)
        if table.empty:
            return
        self.writer.table(
            "Dynamic schedules (no suffix) and multi-step ones (-MS), "
            "bold: best of each kind",
            table,
            analysis.schedule_table(self.configs, self.group, markdown=False),
            f"{self.group}_schedules", index=False,
        )
        comparison = analysis.comparison_table(
            self.all_runs, self.configs, self.group, self.equal_var
        )
        test = "Student's" if self.equal_var else "Welch's"
        display = comparison.drop(
            columns=["test_error_mean", "test_error_std"]
        )
        self.writer.table(
            f"Best beacon vs best dynamic vs best multi-step (p-values: "
            f"{test} two-sample t-test on the per-seed test errors; wall "
            "time: mean per run)",
            display, comparison, f"{self.group}_comparison", index=False,
        )

    def _figures(self):
        configs, group = self.configs, self.group
        has_fixed = (
            (configs["group"] == group) & (configs["kind"] == runs_lib.FIXED)
        ).any()
        if not has_fixed:
            self.writer.text(
                "No figures: they are drawn over fixed-batch runs, and this "
                "group has none. Add fixed batch sizes to the study."
            )
            return
        self.writer.figure(
            "Final test error against batch size, one line per learning "
            "rate (top 5 starred)",
            figures.error_vs_batch_size(
                configs, group, self._path("figures", "error_vs_batch")
            ),
        )
        self.writer.figure(
            "Optimum region: final C̄_K against L_K, lines join one "
            "learning rate, contour: test error of the 5 nearest "
            "configurations in normalised log space",
            figures.optimum_region(
                configs, group, self._path("figures", "optimum_region")
            ),
        )
        rate = self._display_learning_rate()
        self.writer.figure(
            f"C̄_K and L_K against epoch, sampled iteration and cumulative "
            f"learning rate (lr {rate:g})",
            figures.measures_over_time(
                self.epochs, self.samples, self.all_runs, group, rate,
                self._path("figures", "measures_over_time"),
            ),
        )
        if analysis.beacon_learning_rate(configs, group) is not None:
            self.writer.figure(
                "Travel history of the schedules over the beacons",
                figures.travel_history(
                    self.epochs, self.all_runs, group, rate,
                    self._path("figures", "travel_history"),
                ),
            )
        self.writer.figure(
            f"Train and test error curves (lr {rate:g}; dotted: fixed "
            "batch sizes)",
            figures.error_curves(
                self.epochs, self.all_runs, group, rate,
                self._path("figures", "error_curves"),
            ),
        )

    def _display_learning_rate(self):
        """Return the schedules' learning rate, else the best one's."""
        rate = analysis.beacon_learning_rate(self.configs, self.group)
        if rate is not None:
            return rate
        best = analysis.best_configuration(
            self.configs, self.group, runs_lib.FIXED
        )
        if best is not None:
            return float(best["learning_rate"])
        return float(self.runs["learning_rate"].iloc[0])

    def _ranking(self, ranking):
        self.writer.text(
            "**Early ranking.** At each epoch, each fixed-batch "
            "configuration's distance to the optimum region (centroid of "
            "the five best other configurations, by final test error, in "
            "normalised log C̄_K, log L_K space at that epoch) is ranked "
            "against its final test error (Spearman's rho; positive: "
            "configurations far from the region end worse). "
            "`test_error_rho` ranks by that epoch's test error instead; "
            "`condition_rho` and `energy_rho` compare that epoch's C̄_K "
            "and L_K with their final values."
        )
        self.writer.table(
            "Early ranking by epoch", ranking, ranking,
            f"{self.group}_early_ranking", index=False,
        )

    def _nearest(self, reference):
        if reference is None:
            best = analysis.best_configuration(
                self.configs, self.group, runs_lib.FIXED
            )
            if best is None:
                return
            reference = best["label"]
        try:
            nearest = analysis.nearest_configurations(
                self.configs, self.group, reference
            )
        except ValueError as error:
            self.writer.text(f"Nearest configurations: {error}")
            return
        display = nearest.assign(
            test_error=[
                analysis.format_cell(
                    row.test_error_mean, row.test_error_std,
                    row.num_diverged, row.num_runs, percent=True,
                )
                for row in nearest.itertuples()
            ]
        ).drop(columns=[
            "test_error_mean", "test_error_std", "num_diverged", "num_runs",
        ]).rename(
            columns={
                "mean_condition_number_mean": "C̄_K",
                "cumulative_fisher_energy_mean": "L_K",
                "test_error": "test error (%)",
            }
        )
        self.writer.table(
            f"Configurations nearest {reference} in normalised (log C̄_K, "
            "log L_K)",
            display, nearest, f"{self.group}_nearest", index=False,
        )


def parse_flags(argv, flag_values=flags.FLAGS):
    """Parse the command line into `flag_values`, as `absl.app.run` does.

    On an invalid flag, print the error and exit with status 2, as
    `tf_fisher.cli.parse_flags` does for the other programs. That module is
    not imported because importing tf_fisher imports TensorFlow, which the
    report never needs. After a help flag has printed the help, exit with
    status 0, not absl's 1.
    """
    try:
        return flag_values(argv)
    except flags.Error as error:
        print(
            f"Error: {error}\nRun with --helpshort to list the flags.",
            file=sys.stderr,
        )
        sys.exit(2)
    except SystemExit as exit_request:
        # absl's help flags print the help, then exit with status 1. A flag
        # error is raised as flags.Error above, so status 1 means help.
        if exit_request.code == 1:
            sys.exit(0)
        raise


def main(argv, flag_values=flags.FLAGS):
    """Write the report of the folder `argv[1]`; return the exit status."""
    if len(argv) != 2:
        # tf_fisher.cli would import TensorFlow, which the report never needs.
        print(
            "Error: expected one folder. Usage: python -m tools.report "
            "RUNS_DIR [flags]",
            file=sys.stderr,
        )
        return 2
    try:
        path = write_report(
            argv[1], flag_values.output_dir, flag_values.reference,
            flag_values.student,
        )
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
