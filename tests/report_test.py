"""Tests for tools.runs, tools.analysis, tools.claims, tools.figures and
tools.report, on small run folders made up by the tests.

The made-up group has three learning rates x four batch sizes x two seeds
of fixed-batch runs plus two schedules, with final values chosen so that
the expected tables, rankings and p-values can be worked out by hand:

* C̄_K = B (1 + lr) and L_K = 100 lr^1.5 / B at the last epoch, so that
  no two configurations tie, and both scale by the same factor for every
  run at earlier epochs;
* test error = BASE_ERROR[lr, B] + 0.02 seed;
* seed 1 of (lr 0.1, B 8) diverged, with a test error of 0.9.
"""

import csv
import logging
import math
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tf_fisher import callbacks
from tf_fisher import run
from tools import analysis
from tools import claims
from tools import figures
from tools import report
from tools import runs as runs_lib

GROUP = "toy_mlp_e4"
EPOCHS = 4
SEEDS = (0, 1)
BATCH_SIZES = (8, 32, 128, 512)
LEARNING_RATES = (0.025, 0.05, 0.1)
BASE_ERROR = {
    (0.025, 8): 0.09, (0.025, 32): 0.105, (0.025, 128): 0.14,
    (0.025, 512): 0.25,
    (0.05, 8): 0.10, (0.05, 32): 0.06, (0.05, 128): 0.08, (0.05, 512): 0.20,
    (0.1, 8): 0.15, (0.1, 32): 0.05, (0.1, 128): 0.07, (0.1, 512): 0.12,
}
# Mean test errors are BASE_ERROR + 0.01; the five lowest, in order.
TOP_FIVE = ("s32-lr0.1", "s32-lr0.05", "s128-lr0.1", "s128-lr0.05",
            "s8-lr0.025")
# Per-seed test errors of the schedules, at learning rate 0.1.
SCHEDULE_ERRORS = {
    "s32-to-512": (0.06, 0.09),
    "s32-to-512-MS": (0.045, 0.05),
}
SCHEDULE_SIZES = {
    "s32-to-512": (32, 64, 128, 256, 512),
    "s32-to-512-MS": (32, 64, 128, 256, 512),
}


def final_condition(batch_size, learning_rate):
    return batch_size * (1 + learning_rate)


def final_energy(batch_size, learning_rate):
    return 100 * learning_rate**1.5 / batch_size


def write_run(root, schedule, batch_sizes, learning_rate, seed, errors,
              condition, energy, status="completed", group=GROUP):
    """Write a run folder with the layout of tf_fisher.run.train.

    `errors` are the final (train, test) errors. Earlier epochs have 0.05
    more per remaining epoch. C̄_K and L_K at epoch e are the final values
    times (0.5 + e / 8) and e / 4.
    """
    folder = os.path.join(
        root, group, f"{schedule}_lr{learning_rate:g}_seed{seed}"
    )
    os.makedirs(folder)
    config = dict(
        run.RunConfig().__dict__, dataset="mnist5k", model="mlp",
        epochs=EPOCHS, learning_rate=learning_rate,
        batch_sizes=list(batch_sizes), schedule=schedule, seed=seed,
        output_dir=folder,
    )
    run.write_json_atomically(os.path.join(folder, "config.json"), config)
    rows = []
    for epoch in range(1, EPOCHS + 1):
        later = 0.05 * (EPOCHS - epoch)
        rows.append(
            {
                "epoch": epoch,
                "batch_size": batch_sizes[0],
                "learning_rate": learning_rate,
                "train_error": errors[0] + later,
                "test_error": errors[1] + later,
                "mean_condition_number": condition * (0.5 + epoch / 8),
                "cumulative_fisher_energy": energy * epoch / 4,
                "elapsed_seconds": 10.0 * epoch,
            }
        )
    _write_csv(os.path.join(folder, "epochs.csv"), run.EPOCH_COLUMNS, rows)
    samples = [
        {
            "step": 1 + 50 * k,
            "epoch": k + 1,
            "learning_rate": learning_rate / (k + 1),
            "mean_condition_number": row["mean_condition_number"],
            "cumulative_fisher_energy": row["cumulative_fisher_energy"],
        }
        for k, row in enumerate(rows)
    ]
    _write_csv(
        os.path.join(folder, "samples.csv"), callbacks.SAMPLE_COLUMNS,
        samples,
    )
    final = dict(rows[-1])
    summary = {
        "status": status,
        "config": config,
        "schedule": schedule,
        "epochs_completed": EPOCHS,
        "wall_seconds": 40.0 + seed,
        "final": {key: final.get(key, math.nan) for key in run.EPOCH_COLUMNS},
    }
    run.write_json_atomically(os.path.join(folder, "summary.json"), summary)
    return folder


def _write_csv(path, columns, rows):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})


def seed_error(learning_rate, batch_size, seed):
    if (learning_rate, batch_size, seed) == (0.1, 8, 1):
        return 0.9
    return BASE_ERROR[(learning_rate, batch_size)] + 0.02 * seed


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep"))
    for rate in LEARNING_RATES:
        for size in BATCH_SIZES:
            for seed in SEEDS:
                diverged = (rate, size, seed) == (0.1, 8, 1)
                test = seed_error(rate, size, seed)
                write_run(
                    root, f"s{size}", (size,), rate, seed,
                    (test / 2, test),
                    math.nan if diverged else final_condition(size, rate),
                    math.nan if diverged else final_energy(size, rate),
                    status="diverged" if diverged else "completed",
                )
    for name, errors in SCHEDULE_ERRORS.items():
        for seed, test in zip(SEEDS, errors):
            write_run(
                root, name, SCHEDULE_SIZES[name], 0.1, seed, (0.0, test),
                final_condition(128, 0.1), final_energy(64, 0.1),
            )
    # An interrupted run: config.json but no summary.json.
    os.makedirs(os.path.join(root, GROUP, "s8_lr0.2_seed0"))
    run.write_json_atomically(
        os.path.join(root, GROUP, "s8_lr0.2_seed0", "config.json"), {}
    )
    return root


@pytest.fixture(scope="module")
def loaded(sweep_root):
    runs = runs_lib.load_runs(sweep_root)
    configs = analysis.summarise(runs)
    epochs = runs_lib.load_epochs(sweep_root, runs)
    return runs, configs, epochs


def config_row(configs, label):
    rows = configs[configs["label"] == label]
    assert len(rows) == 1, label
    return rows.iloc[0]


def test_load_runs_reads_every_finished_run(sweep_root, loaded):
    runs, _, _ = loaded
    assert len(runs) == 12 * 2 + 2 * 2
    assert set(runs["group"]) == {GROUP}
    assert runs_lib.unfinished_runs(sweep_root) == [
        os.path.join(GROUP, "s8_lr0.2_seed0")
    ]
    kinds = runs.groupby("kind")["run"].count().to_dict()
    assert kinds == {"fixed": 24, "dynamic": 2, "multi-step": 2}
    assert runs["diverged"].sum() == 1


def test_load_samples_adds_cumulative_learning_rate(sweep_root, loaded):
    runs, _, _ = loaded
    samples = runs_lib.load_samples(sweep_root, runs)
    name = os.path.join(GROUP, "s32_lr0.1_seed0")
    first_run = samples[samples["run"] == name]
    assert list(first_run["sample"]) == [1, 2, 3, 4]
    expected = np.cumsum([0.1 / (k + 1) for k in range(4)])
    np.testing.assert_allclose(
        first_run["cumulative_learning_rate"], expected
    )


def test_summary_mean_and_std_over_seeds(loaded):
    _, configs, _ = loaded
    row = config_row(configs, "s32-lr0.1")
    # Seeds 0.05 and 0.07: mean 0.06, sample std 0.02 / sqrt(2).
    assert row["test_error_mean"] == pytest.approx(0.06)
    assert row["test_error_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert row["num_runs"] == 2
    assert row["wall_seconds_mean"] == pytest.approx(40.5)


def test_summary_counts_diverged_run(loaded):
    _, configs, _ = loaded
    row = config_row(configs, "s8-lr0.1")
    assert row["num_diverged"] == 1
    assert row["test_error_mean"] == pytest.approx((0.15 + 0.9) / 2)
    # The diverged run's NaN measures are left out of the mean.
    assert row["mean_condition_number_mean"] == pytest.approx(8 * 1.1)
    assert math.isnan(row["rank"])


def test_top_five_by_mean_test_error(loaded):
    _, configs, _ = loaded
    ranked = configs[configs["rank"].notna()].sort_values("rank")
    assert tuple(ranked["label"].head(5)) == TOP_FIVE
    assert set(configs.loc[configs["top"], "label"]) == set(TOP_FIVE)
    assert len(ranked) == 11


def test_grid_table_cells(loaded):
    _, configs, _ = loaded
    table = analysis.grid_table(configs, GROUP, "test_error")
    assert list(table.columns) == ["8", "32", "128", "512"]
    assert list(table.index) == ["0.025", "0.05", "0.1"]
    assert table.loc["0.1", "32"] == "**6.00 ± 1.41**"
    assert table.loc["0.1", "512"] == "13.00 ± 1.41"
    assert table.loc["0.1", "8"] == "52.50 ± 53.03 (1/2 diverged)"
    plain = analysis.grid_table(configs, GROUP, "test_error", markdown=False)
    assert plain.loc["0.1", "32"] == "6.00 ± 1.41 *"
    energy = analysis.grid_table(configs, GROUP, "cumulative_fisher_energy")
    assert energy.loc["0.05", "8"] == f"{100 * 0.05**1.5 / 8:.4g} ± 0"


def test_format_cell_one_seed_has_no_std():
    assert analysis.format_cell(0.1234, math.nan, percent=True) == "12.34"
    assert analysis.format_cell(1234.5, math.nan) == "1234"


def test_grid_table_marks_missing_seeds(loaded):
    """A configuration with fewer finished runs than the others, as a
    running sweep leaves it, shows its seed count."""
    runs, _, _ = loaded
    fewer = runs[~((runs["schedule"] == "s512") & (runs["seed"] == 1))]
    configs = analysis.summarise(fewer)
    table = analysis.grid_table(configs, GROUP, "test_error")
    assert table.loc["0.1", "512"].endswith(" (1 of 2 seeds)")
    assert table.loc["0.1", "32"] == "**6.00 ± 1.41**"
    assert analysis.format_cell(
        0.5, math.nan, num_runs=1, percent=True, expected_runs=3
    ) == "50.00 (1 of 3 seeds)"


def welch_p_value(first, second):
    """Welch's two-sided p-value from its closed form."""
    first, second = np.asarray(first), np.asarray(second)
    var1 = first.var(ddof=1) / len(first)
    var2 = second.var(ddof=1) / len(second)
    t = (first.mean() - second.mean()) / math.sqrt(var1 + var2)
    dof = (var1 + var2) ** 2 / (
        var1**2 / (len(first) - 1) + var2**2 / (len(second) - 1)
    )
    return 2 * stats.t.sf(abs(t), dof)


def test_comparison_table_t_tests(loaded):
    runs, configs, _ = loaded
    table = analysis.comparison_table(runs, configs, GROUP).set_index(
        "model"
    )
    assert list(table.index) == ["beacon", "dynamic", "multi-step"]
    assert table.loc["beacon", "name"] == "s32-lr0.1"
    assert table.loc["dynamic", "name"] == "s32-to-512-lr0.1"
    assert table.loc["multi-step", "name"] == "s32-to-512-MS-lr0.1"
    beacon = (0.05, 0.07)
    dynamic = SCHEDULE_ERRORS["s32-to-512"]
    multi = SCHEDULE_ERRORS["s32-to-512-MS"]
    assert table.loc["dynamic", "p vs beacon"] == pytest.approx(
        welch_p_value(dynamic, beacon)
    )
    assert table.loc["multi-step", "p vs beacon"] == pytest.approx(
        welch_p_value(multi, beacon)
    )
    assert table.loc["multi-step", "p dynamic vs multi-step"] == (
        pytest.approx(welch_p_value(dynamic, multi))
    )
    assert math.isnan(table.loc["beacon", "p vs beacon"])
    assert table.loc["multi-step", "test error (%)"] == "4.75 ± 0.35"


def test_student_t_test_differs_from_welch():
    first, second = (1.0, 2.0, 3.0), (1.0, 5.0, 9.0, 13.0)
    welch = analysis.two_sample_t_test(first, second)
    student = analysis.two_sample_t_test(first, second, equal_var=True)
    assert welch == pytest.approx(welch_p_value(first, second))
    assert student != pytest.approx(welch)


def test_knn_contour_matches_brute_force():
    rng = np.random.default_rng(0)
    condition = 10 ** rng.uniform(0, 3, 9)
    energy = 10 ** rng.uniform(-2, 1, 9)
    values = rng.uniform(0, 1, 9)
    grid_c, grid_l, grid_values = analysis.knn_contour(
        condition, energy, values, k=5, resolution=6
    )
    logs = np.column_stack([np.log10(condition), np.log10(energy)])
    low, high = logs.min(axis=0), logs.max(axis=0)
    scaled = (logs - low) / (high - low)
    for i in range(6):
        for j in range(6):
            query = (
                (np.log10(grid_c[i, j]) - low[0]) / (high[0] - low[0]),
                (np.log10(grid_l[i, j]) - low[1]) / (high[1] - low[1]),
            )
            distances = [math.dist(query, point) for point in scaled]
            nearest = sorted(range(9), key=distances.__getitem__)[:5]
            assert grid_values[i, j] == pytest.approx(values[nearest].mean())
    # The grid spans the points' range plus 5% on each side.
    assert np.log10(grid_c.min()) == pytest.approx(
        low[0] - 0.05 * (high[0] - low[0])
    )


def test_nearest_configurations_brute_force(loaded):
    _, configs, _ = loaded
    nearest = analysis.nearest_configurations(
        configs, GROUP, "s32-lr0.1", k=3
    )
    points = configs[
        np.isfinite(configs["mean_condition_number_mean"])
    ].set_index("label")
    logs = np.log10(
        points[["mean_condition_number_mean",
                "cumulative_fisher_energy_mean"]].to_numpy()
    )
    scaled = (logs - logs.min(axis=0)) / np.ptp(logs, axis=0)
    reference = scaled[list(points.index).index("s32-lr0.1")]
    distances = {
        label: math.dist(point, reference)
        for label, point in zip(points.index, scaled)
        if label != "s32-lr0.1"
    }
    expected = sorted(distances, key=distances.get)[:3]
    assert list(nearest["label"]) == expected
    np.testing.assert_allclose(
        nearest["distance"], [distances[label] for label in expected]
    )


def test_nearest_table_marks_diverged_runs(sweep_root, tmp_path):
    """One of the two seeds of s8-lr0.1 diverged, so its row among the
    configurations nearest s8-lr0.05 ends in "(1/2 diverged)", as in the
    other tables."""
    path = report.write_report(
        sweep_root, str(tmp_path / "report"), reference="s8-lr0.05"
    )
    with open(path) as file:
        text = file.read()
    table = text.split("Configurations nearest s8-lr0.05")[1].split("\n\n")[1]
    (row,) = [line for line in table.splitlines() if "| s8-lr0.1 |" in line]
    assert row.endswith("(1/2 diverged) |")


def test_nearest_configurations_unknown_reference(loaded):
    _, configs, _ = loaded
    with pytest.raises(ValueError, match="s9-lr0.1"):
        analysis.nearest_configurations(configs, GROUP, "s9-lr0.1")


def test_nearest_configurations_reference_without_measures(loaded):
    """A configuration whose runs all diverged has NaN measures: it is
    named as such, not as unknown."""
    _, configs, _ = loaded
    configs = configs.copy()
    broken = configs["label"] == "s8-lr0.1"
    configs.loc[broken, "mean_condition_number_mean"] = math.nan
    with pytest.raises(ValueError) as error:
        analysis.nearest_configurations(configs, GROUP, "s8-lr0.1")
    message = str(error.value)
    assert "has no finite, positive C̄_K and L_K" in message
    assert "Unknown" not in message


def spearman_by_ranks(first, second):
    """Spearman's rho as the Pearson correlation of the ranks."""
    return np.corrcoef(stats.rankdata(first), stats.rankdata(second))[0, 1]


def test_early_ranking_by_hand(loaded):
    runs, configs, epochs = loaded
    ranking = analysis.early_ranking(epochs, runs, configs, GROUP)
    assert list(ranking["epoch"]) == [1, 2, 3, 4]
    ranked = configs[configs["rank"].notna()]
    labels = list(ranked["label"])
    final_error = ranked["test_error_mean"].to_numpy()
    condition = ranked["mean_condition_number_mean"].to_numpy()
    energy = ranked["cumulative_fisher_energy_mean"].to_numpy()
    logs = np.column_stack([np.log10(condition), np.log10(energy)])
    scaled = (logs - logs.min(axis=0)) / np.ptp(logs, axis=0)
    distances = []
    for i in range(len(labels)):
        others = sorted(
            (j for j in range(len(labels)) if j != i),
            key=lambda j: final_error[j],
        )[:5]
        centroid = scaled[others].mean(axis=0)
        distances.append(math.dist(scaled[i], centroid))
    expected = spearman_by_ranks(distances, final_error)
    # Every epoch scales all runs alike, so the positions never change.
    np.testing.assert_allclose(ranking["distance_rho"], expected)
    np.testing.assert_allclose(ranking["condition_rho"], 1.0)
    np.testing.assert_allclose(ranking["energy_rho"], 1.0)
    assert (ranking["num_configurations"] == 11).all()


def test_travel_epochs():
    assert analysis.travel_epochs(10) == [1, 2, 4, 6, 8, 10]
    assert analysis.travel_epochs(4) == [1, 1, 2, 3, 4, 4]
    assert analysis.travel_epochs(320) == [16, 64, 128, 192, 256, 320]


def test_travel_history_reads_epochs(loaded):
    runs, _, epochs = loaded
    history = analysis.travel_history(epochs, runs, GROUP, 0.1)
    line = history[history["label"] == "s32-to-512-lr0.1"]
    assert list(line["epoch"]) == [1, 1, 2, 3, 4, 4]
    expected = final_condition(128, 0.1) * (0.5 + 2 / 8)
    assert line["mean_condition_number"].iloc[2] == pytest.approx(expected)
    assert set(history["kind"]) == {"fixed", "dynamic", "multi-step"}


def test_claims_verdicts(loaded):
    runs, configs, epochs = loaded
    ranking = analysis.early_ranking(epochs, runs, configs, GROUP)
    found = claims.check_claims(configs, ranking, GROUP, EPOCHS)
    verdicts = {claim.statement: claim.verdict for claim in found}
    assert verdicts["C̄_K grows with the batch size"] == claims.HOLDS
    assert verdicts["L_K shrinks with the batch size"] == claims.HOLDS
    assert verdicts["L_K grows with the learning rate"] == claims.HOLDS
    # B 8 (lr 0.1 diverged) has two learning rates left, too few.
    assert "B=8" not in found[2].evidence
    expected_early = (
        claims.HOLDS if ranking["distance_rho"].iloc[0] >= 0.5
        else claims.PARTLY if ranking["distance_rho"].iloc[0] > 0
        else claims.FAILS
    )
    assert found[5].verdict == expected_early


def test_both_small_percentiles_by_hand(loaded):
    _, configs, _ = loaded
    claim = claims.both_small_claim(configs, GROUP)
    ranked = configs[configs["rank"].notna()]
    best = set(TOP_FIVE)
    percentiles = []
    for column in ("mean_condition_number_mean",
                   "cumulative_fisher_energy_mean"):
        ordered = sorted(ranked[column])
        positions = [
            ordered.index(value) / (len(ordered) - 1)
            for label, value in zip(ranked["label"], ranked[column])
            if label in best
        ]
        percentiles.append(sum(positions) / len(positions))
    assert f"C̄_K {percentiles[0]:.2f}, L_K {percentiles[1]:.2f}" in (
        claim.evidence
    )
    small = sum(value < 0.5 for value in percentiles)
    assert claim.verdict == {2: claims.HOLDS, 1: claims.PARTLY,
                             0: claims.FAILS}[small]


def test_trend_claim_fails_on_reversed_trend(loaded):
    _, configs, _ = loaded
    reversed_configs = configs.copy()
    reversed_configs["mean_condition_number_mean"] = (
        1.0 / reversed_configs["mean_condition_number_mean"]
    )
    rhos = claims.trend(
        reversed_configs, GROUP, "mean_condition_number", "batch_size",
        "learning_rate",
    )
    assert rhos == {0.025: -1.0, 0.05: -1.0, 0.1: -1.0}
    assert claims.sign_verdict(rhos, +1) == claims.FAILS
    assert claims.sign_verdict({1: 0.5, 2: 0.4, 3: -0.1}, +1) == (
        claims.PARTLY
    )
    assert claims.sign_verdict({}, +1) == claims.NO_DATA


def assert_image_files(paths):
    png, pdf = paths
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(pdf, "rb") as file:
        assert file.read(5) == b"%PDF-"
    assert os.path.getsize(png) > 5000


def test_figures_write_png_and_pdf(sweep_root, loaded, tmp_path):
    runs, configs, epochs = loaded
    samples = runs_lib.load_samples(sweep_root, runs)
    stem = str(tmp_path / "figure")
    assert_image_files(
        figures.error_vs_batch_size(configs, GROUP, stem + "_error")
    )
    assert_image_files(
        figures.optimum_region(configs, GROUP, stem + "_region")
    )
    assert_image_files(
        figures.measures_over_time(
            epochs, samples, runs, GROUP, 0.1, stem + "_time"
        )
    )
    assert_image_files(
        figures.travel_history(epochs, runs, GROUP, 0.1, stem + "_travel")
    )
    assert_image_files(
        figures.error_curves(epochs, runs, GROUP, 0.1, stem + "_curves")
    )


def test_region_points_leave_out_diverged():
    """Diverged configurations are named whether their measures are finite
    (g) or NaN (h)."""
    configs = pd.DataFrame({
        "group": GROUP,
        "kind": runs_lib.FIXED,
        "label": list("abcdefgh"),
        "num_diverged": [0, 0, 0, 0, 0, 0, 1, 2],
        "mean_condition_number_mean": [1.0] * 7 + [math.nan],
        "cumulative_fisher_energy_mean": [1.0] * 7 + [math.nan],
    })
    kept, diverged, notes = figures.region_points(configs, GROUP, 5)
    assert list(kept["label"]) == list("abcdef")
    assert diverged == ["g", "h"]
    assert notes == ["left out, a run diverged: g, h"]
    # Five configurations: each grid point would average them all.
    kept, diverged, notes = figures.region_points(configs.iloc[1:], GROUP, 5)
    assert list(kept["label"]) == list("bcdef")
    assert notes[1] == (
        "no test-error contour: 5 configurations, and the contour averages "
        "the 5 nearest"
    )


def test_write_report(sweep_root, tmp_path):
    output_dir = str(tmp_path / "report")
    path = report.write_report(sweep_root, output_dir)
    with open(path) as file:
        text = file.read()
    assert "## toy_mlp_e4" in text
    assert "| 0.1 | 52.50 ± 53.03 (1/2 diverged) | **6.00 ± 1.41** |" in text
    assert "1 unfinished" in text
    assert "Configurations nearest s32-lr0.1" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 5
    for image in images:
        assert_image_files(
            [os.path.join(output_dir, image),
             os.path.join(output_dir, image[:-4] + ".pdf")]
        )
    tables = os.path.join(output_dir, "tables")
    for name in ("test_error", "train_error", "condition_number",
                 "fisher_energy", "comparison", "claims", "early_ranking"):
        assert os.path.exists(os.path.join(tables, f"{GROUP}_{name}.csv"))
        assert os.path.exists(os.path.join(tables, f"{GROUP}_{name}.md"))


def test_write_report_rejects_bad_input(sweep_root, tmp_path):
    """An unknown --reference and an --output_dir that is a file are
    errors that name the value, raised before anything is written."""
    output_dir = tmp_path / "report"
    with pytest.raises(ValueError, match=r"--reference=s9-lr9.*s128-lr0.025"):
        report.write_report(sweep_root, str(output_dir), reference="s9-lr9")
    assert not output_dir.exists()
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ValueError, match=f"--output_dir={afile}"):
        report.write_report(sweep_root, str(afile))
    assert afile.read_text() == "keep me"


def test_load_runs_names_corrupt_summary(tmp_path):
    write_run(str(tmp_path), "s8", (8,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    path = tmp_path / GROUP / "s8_lr0.1_seed0" / "summary.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=f"Invalid {path}: it is not valid"):
        runs_lib.load_runs(str(tmp_path))


def test_load_runs_names_summary_not_object(tmp_path):
    write_run(str(tmp_path), "s8", (8,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    path = tmp_path / GROUP / "s8_lr0.1_seed0" / "summary.json"
    path.write_text("[]")
    with pytest.raises(ValueError) as error:
        runs_lib.load_runs(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"Invalid {path}: expected a JSON object")
    assert "found list" in message
    assert "move the run folder out" in message


def one_run_file(tmp_path, name):
    """Write one finished run and return the path of its file `name` and
    that file's lines."""
    write_run(str(tmp_path), "s8", (8,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    path = tmp_path / GROUP / "s8_lr0.1_seed0" / name
    return path, path.read_text().splitlines()


def report_error(tmp_path):
    """Return the message of the ValueError that the report raises."""
    with pytest.raises(ValueError) as error:
        report.write_report(str(tmp_path), str(tmp_path / "report"))
    return str(error.value)


@pytest.mark.parametrize("damage", ["extra_field", "not_text", "no_column"])
def test_report_names_damaged_csv(tmp_path, damage):
    path, lines = one_run_file(tmp_path, "samples.csv")
    if damage == "extra_field":
        lines.append(lines[-1] + ",1,2,3")
        path.write_text("\n".join(lines) + "\n")
        expected = "it cannot be read as CSV"
    elif damage == "not_text":
        path.write_bytes(bytes(range(128, 256)) * 4)
        expected = "it cannot be read as CSV"
    else:
        header = lines[0].replace("learning_rate", "rate")
        path.write_text("\n".join([header] + lines[1:]) + "\n")
        expected = "the columns learning_rate are missing"
    message = report_error(tmp_path)
    assert message.startswith(f"Invalid {path}: ")
    assert expected in message
    assert "move the run folder out" in message


@pytest.mark.parametrize("damage", ["header_only", "cut_row", "missing"])
def test_report_names_damaged_epochs(tmp_path, damage):
    path, lines = one_run_file(tmp_path, "epochs.csv")
    if damage == "header_only":
        path.write_text(lines[0] + "\n")
        expected = "the run completed, but the file is missing or has no rows"
    elif damage == "cut_row":
        fields = lines[-1].split(",")
        path.write_text("\n".join(lines[:-1] + [",".join(fields[:3])]) + "\n")
        expected = f"line {len(lines)} has 3 fields, the header"
    else:
        path.unlink()
        expected = "the run completed, but the file is missing or has no rows"
    message = report_error(tmp_path)
    assert message.startswith(f"Invalid {path}: ")
    assert expected in message


def test_report_names_sweep_record_not_object(tmp_path):
    write_run(str(tmp_path), "s8", (8,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    path = tmp_path / "sweep.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError) as error:
        report.write_report(str(tmp_path), str(tmp_path / "report"))
    assert str(error.value).startswith(
        f"Invalid {path}: expected a JSON object, found list."
    )


def test_write_report_without_runs(tmp_path):
    with pytest.raises(ValueError, match="No finished run"):
        report.write_report(str(tmp_path))


def test_markdown_table_escapes_pipes():
    import pandas as pd

    frame = pd.DataFrame({"a": ["x|y"], "b": [math.nan]})
    assert report.markdown_table(frame, index=False) == (
        "| a | b |\n| --- | --- |\n| x\\|y |  |\n"
    )


def test_write_report_logs_table_and_figure_counts(
    sweep_root, tmp_path, caplog
):
    """The closing log line counts the page's tables and figures, each
    written as two files, as the folders hold them. The tidy
    configurations CSV is no table of the page."""
    output_dir = tmp_path / "report"
    with caplog.at_level(logging.INFO, logger="absl"):
        path = report.write_report(sweep_root, str(output_dir))
    num_tables = len(list((output_dir / "tables").glob("*.md")))
    num_figures = len(list((output_dir / "figures").glob("*.png")))
    csv_names = {entry.name for entry in (output_dir / "tables").glob("*.csv")}
    assert len(csv_names - {f"{GROUP}_configurations.csv"}) == num_tables
    assert len(list((output_dir / "figures").glob("*.pdf"))) == num_figures
    assert (
        f"Wrote {path} with {num_tables} tables (CSV and Markdown) and "
        f"{num_figures} figures (PNG and PDF)" in caplog.messages
    )


def test_write_report_singular_counts(tmp_path):
    """One run of one seed reads "1 run", "1 seed", not "1 runs"."""
    root = str(tmp_path / "sweep")
    write_run(root, "s32", (32,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    with open(report.write_report(root)) as file:
        text = file.read()
    assert f"mnist5k, mlp, {EPOCHS} epochs: 1 run (0 diverged), 1 seed," in (
        text
    )
    assert "1 finished run (0 diverged)" in text
    assert "1 runs" not in text
    assert "1 seeds" not in text
    assert report._plural(1, "epoch") == "1 epoch"
    assert report._plural(0, "epoch") == "0 epochs"


@pytest.mark.parametrize(
    "interrupted, ending", [(False, "(0 failed)."), (True, "interrupted.")]
)
def test_report_names_last_sweep(tmp_path, interrupted, ending):
    root = str(tmp_path / "sweep")
    write_run(root, "s32", (32,), 0.1, 0, (0.1, 0.2), 10.0, 1.0)
    last_sweep = {
        "trained": 1, "failed": 0, "jobs": 2, "threads_per_job": 1,
        "wall_seconds": 12.0, "interrupted": interrupted,
    }
    run.write_json_atomically(
        os.path.join(root, "sweep.json"), {"last_sweep": last_sweep}
    )
    with open(report.write_report(root)) as file:
        text = file.read()
    line = next(
        line for line in text.splitlines() if line.startswith("Last sweep")
    )
    assert line.startswith("Last sweep: 1 run trained in 12 s wall time")
    assert line.endswith(ending)


def test_report_bad_flag_exits_2_without_tensorflow():
    """An unknown flag prints one error and exits with status 2, as the
    other programs do, and the report still imports no TensorFlow."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['report', 'runs', '--bogus']\n"
        "try:\n"
        "    runpy.run_module('tools.report', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True,
        text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.stdout == "2 False\n", result.stderr
    assert result.stderr.splitlines() == [
        "Error: Unknown command line flag 'bogus'",
        "Run with --helpshort to list the flags.",
    ]


def visible_tick_labels(axis, minor=False):
    """The non-empty labels of the ticks inside the axis limits."""
    low, high = axis.get_view_interval()
    if minor:
        ticks, locations = axis.get_minor_ticks(), axis.get_minorticklocs()
    else:
        ticks, locations = axis.get_major_ticks(), axis.get_majorticklocs()
    return [
        tick.label1.get_text()
        for tick, location in zip(ticks, locations)
        if low <= location <= high and tick.label1.get_text()
    ]


def test_log_axes_label_narrow_range_plainly():
    """C̄_K from 1.4e4 to 2.2e4 gets a few plain labels, where matplotlib
    would label eight minor ticks in scientific notation; L_K over two
    decades keeps the powers of ten."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([1.4e4, 1.8e4, 2.2e4], [1.0, 10.0, 100.0])
    figures._log_axes(axes)
    figure.canvas.draw()
    labels = visible_tick_labels(axes.xaxis)
    assert 2 <= len(labels) <= 6
    for label in labels:
        assert 1.3e4 <= float(label) <= 2.3e4
    assert visible_tick_labels(axes.xaxis, minor=True) == []
    assert axes.get_yscale() == "log"
    assert visible_tick_labels(axes.yaxis) == [
        "$\\mathdefault{10^{0}}$", "$\\mathdefault{10^{1}}$",
        "$\\mathdefault{10^{2}}$",
    ]
    plt.close(figure)


@pytest.mark.parametrize(
    "module", ["tools.analysis", "tools.claims", "tools.figures", "tools.runs"]
)
def test_library_module_run_as_command_exits_2(module):
    """Run with -m, a module that only the report uses prints an error
    that points to tools.report and exits 2, rather than exit 0 having
    written nothing."""
    result = subprocess.run(
        [sys.executable, "-m", module], check=False,
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"Error: {module} is a library module, not a command. "
        "`python -m tools.report RUNS_DIR` writes"
    )


def test_report_without_folder_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "tools.report"], check=False,
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "Error: expected one folder. Usage: python -m tools.report RUNS_DIR"
    )
