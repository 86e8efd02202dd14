"""Tests of `tools.benchmark`: its reference routes, its sums and a real cell.

Timings are never asserted; only what the tool computes from them is.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from tf_fisher import gram
from tools import benchmark


def test_reference_routes_match_fast_gram(digits):
    """The whole-model and loop routes, which the tool times against the
    fast path, give the fast path's matrix on a network without
    BatchNormalization."""
    network = benchmark.build_variant("plain", "mlp", seed=0)
    x, y = benchmark.batch_of_digits("mlp", 6, digits)
    loss = benchmark._loss()
    fast = gram.gram_matrix(network, loss, x, y).numpy()
    for route in (benchmark.whole_model_gram, benchmark.loop_gram):
        reference = route(network, loss, x, y).numpy()
        np.testing.assert_allclose(
            reference, fast, rtol=1e-4, atol=1e-4 * np.abs(fast).max()
        )


def test_timed_reference_models_record_the_fast_measures(digits):
    """The whole-model and loop models that the tool times record the
    measures of the `fast` model for the same step of a network without
    BatchNormalization, taken as in the timing: on a batch of unknown
    size."""
    x, y = benchmark.batch_of_digits("mlp", 8, digits)
    recorded = {}
    for variant in ("fast", "whole_model", "loop"):
        model = benchmark.build_variant(variant, "mlp", seed=0)
        model.make_train_function()
        benchmark.run_step(variant, model, benchmark.repeated_batch(x, y))
        recorded[variant] = model.read_probe_values()
    assert recorded["fast"]["batch_size"] == 8
    assert recorded["fast"]["lambda_max"] > 0
    for variant in ("whole_model", "loop"):
        for key, value in recorded["fast"].items():
            assert recorded[variant][key] == pytest.approx(
                value, rel=1e-4, abs=1e-6
            ), (variant, key)


def test_summary_ratios_overhead_and_interval():
    results = {
        "plain": {"median_ms": 10.0, "median_cpu_ms": 20.0},
        "fast": {"median_ms": 13.0, "median_cpu_ms": 30.0},
        "loop": {"median_ms": 130.0, "median_cpu_ms": 200.0},
        "whole_model": {"skipped": "over budget"},
    }
    summary = benchmark.summarise_cell(results, interval=50)
    with_next_step = benchmark.summarise_cell(
        dict(results, unprobed={"median_ms": 10.5, "median_cpu_ms": 20.0},
             after_probe={"median_ms": 12.5, "median_cpu_ms": 25.0}),
        interval=50,
    )
    # The step after the probe adds 12.5 - 10.5 ms: (3 + 2) / (50 * 10).
    assert with_next_step["after_probe_extra_ms"] == pytest.approx(2.0)
    assert with_next_step["epoch_overhead"] == pytest.approx(0.01)
    assert with_next_step["interval_for_target"] == 25
    variants = summary["variants"]
    assert variants["fast"]["ratio_to_plain"] == pytest.approx(1.3)
    assert variants["fast"]["cpu_ratio_to_plain"] == pytest.approx(1.5)
    assert "ratio_to_plain" not in variants["whole_model"]
    assert summary["loop_over_fast"] == pytest.approx(10.0)
    # (13 - 10) / (50 * 10).
    assert summary["epoch_overhead"] == pytest.approx(0.006)
    # 3 ms of probe over 0.02 * 10 ms per step: 15 steps.
    assert summary["interval_for_target"] == 15
    assert benchmark.summarise_cell(
        results, interval=50, overhead_target=0.5
    )["interval_for_target"] == 1


def test_summary_eigenvalue_overhead():
    """The faster eigenvalue solver's time over N plain steps, kept out of
    the variants."""
    results = {
        "plain": {"median_ms": 10.0, "median_cpu_ms": 20.0},
        "fast": {"median_ms": 13.0, "median_cpu_ms": 30.0},
        "eigenvalues": {
            "tensorflow_ms": 4.0, "lapack_ms": 2.5,
            "largest_difference": 1e-15,
        },
    }
    summary = benchmark.summarise_cell(results, interval=50)
    assert "eigenvalues" in results
    assert "eigenvalues" not in summary["variants"]
    # 2.5 ms over 50 plain steps of 10 ms.
    assert summary["eigenvalues"]["epoch_overhead"] == pytest.approx(0.005)
    assert summary["eigenvalues"]["tensorflow_ms"] == 4.0
    report = {
        "settings": {"interval": 50, "overhead_target": 0.02},
        "results": [dict(summary, model="mlp", batch_size=512)],
    }
    header, _, row = benchmark.format_eigenvalue_table(report).splitlines()
    assert "N=50" in header
    columns = [column.strip() for column in row.strip("|").split("|")]
    assert columns == [
        "mlp", "512", "10.0", "3.0", "4.0", "2.5", "0.50%", "0.60%"
    ]
    report["results"][0].pop("eigenvalues")
    assert benchmark.format_eigenvalue_table(report) == ""


def test_cell_timing_and_table_row(digits):
    settings = {
        "repeats": 2, "warmup": 1, "memory_repeats": 1,
        "budget_seconds": 60.0, "seed": 0, "interval": 50,
        "overhead_target": 0.02,
    }
    results = benchmark.time_cell(
        "mlp", 4, ["plain", "unprobed", "fast", "loop"], {}, settings, digits
    )
    eigenvalues = results.pop("eigenvalues")
    assert eigenvalues["tensorflow_ms"] > 0
    assert eigenvalues["lapack_ms"] > 0
    # TensorFlow's and LAPACK's spectra of the same float64 matrix.
    assert eigenvalues["largest_difference"] < 1e-10
    assert set(results) == {
        "plain", "unprobed", "fast", "after_probe", "loop"
    }
    assert "peak_memory_mb" not in results["plain"]
    for result in results.values():
        assert len(result["times_ms"]) == 2
        assert result["median_ms"] == pytest.approx(
            float(np.median(result["times_ms"]))
        )
        assert result["median_ms"] > 0
        # Keras leaves XLA off by default on a machine without a GPU.
        assert result["jit_compile"] is False
    cell = {"model": "mlp", "batch_size": 4}
    cell.update(benchmark.summarise_cell(results, 50))
    report = {"settings": settings, "results": [cell]}
    json.dumps(report)
    header, rule, row = benchmark.format_table(report).splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 13
    columns = [column.strip() for column in row.strip("|").split("|")]
    assert columns[:2] == ["mlp", "4"]
    assert columns[6] == "-"  # whole_model was not timed
    assert columns[10] == str(cell["interval_for_target"])
    assert math.isfinite(cell["epoch_overhead"])


def test_oversized_batch_is_rejected(digits):
    too_many = len(digits.train_images) + 1
    with pytest.raises(ValueError, match=f"Invalid batch size {too_many}"):
        benchmark.batch_of_digits("mlp", too_many, digits)


def test_over_budget_variant_is_skipped():
    settings = {
        "warmup": 1, "repeats": 9, "memory_repeats": 0,
        "budget_seconds": 10.0,
    }
    previous = {"loop": (16, 0.5)}
    # 0.5 s at batch 16 scales to 2 s at 64, times 10 steps: 20 s.
    reason = benchmark._over_budget(previous, "loop", 64, settings)
    assert reason is not None
    assert "estimated 20 s" in reason
    assert benchmark._over_budget(previous, "loop", 16, settings) is None
    assert benchmark._over_budget(previous, "plain", 10**6, settings) is None


def test_unprobed_is_timed_with_fast():
    """The epoch overhead needs the step after a probe, which the
    `unprobed` model takes."""
    assert benchmark._variants_to_time(["fast"]) == [
        "plain", "unprobed", "fast"
    ]
    assert benchmark._variants_to_time(["loop", "plain"]) == ["plain", "loop"]


@pytest.mark.parametrize(
    "argument, message",
    [
        ("--models=foo", "expected a comma-separated list from mlp"),
        ("--variants=fast,exact", "--variants=fast,exact"),
        ("--batch_sizes=16,abc", "expected positive integers"),
        ("--batch_sizes=0", "--batch_sizes=0"),
        ("--overhead_target=0", "must be a fraction in \\(0, 1\\)"),
        ("--overhead_target=2", "must be a fraction in \\(0, 1\\)"),
        ("--repeats=0", "--repeats"),
        ("--memory_timeout_seconds=0.5", "0.5 is not number >= 1.0"),
        ("--memory_timeout_seconds=nan", "must be a finite number"),
        ("--memory_timeout_seconds=inf", "must be a finite number"),
        ("--block_overlap=-1", "-1 is not a non-negative integer"),
        ("--jit_compile=yes", "should be one of <auto|true|false>"),
    ],
)
def test_bad_flags_are_rejected(argument, message):
    flag_values = benchmark.define_flags(flags.FlagValues())
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        flag_values(["benchmark", argument])


def test_settings_deduplicate_batch_sizes():
    flag_values = benchmark.define_flags(flags.FlagValues())
    flag_values([
        "benchmark", "--batch_sizes=32,16,32", "--overhead_target=0.05",
        "--variants=loop", "--models=resnet8,mlp,resnet8",
        "--block_overlap=0", "--jit_compile=True",
    ])
    settings = benchmark.settings_from_flags(flag_values)
    assert settings["batch_sizes"] == [16, 32]
    assert settings["models"] == ["resnet8", "mlp"]
    assert settings["overhead_target"] == pytest.approx(0.05)
    assert settings["variants"] == ["plain", "loop"]
    assert settings["block_overlap"] == 0
    assert settings["jit_compile"] == "true"


@pytest.mark.parametrize("variant", ["fast", "unprobed"])
def test_variant_takes_block_overlap(variant):
    model = benchmark.build_variant(variant, "mlp", 0, block_overlap=0)
    assert model.block_overlap == 0
    default = benchmark.build_variant(variant, "mlp", 0)
    assert default.block_overlap == gram.DEFAULT_BLOCK_OVERLAP


@pytest.mark.parametrize("variant", benchmark.VARIANTS)
def test_variant_takes_jit_compile(variant):
    for value, expected in (("true", True), ("false", False)):
        model = benchmark.build_variant(variant, "mlp", 0, jit_compile=value)
        assert model.jit_compile is expected
    # Keras turns XLA off for "auto" on a machine without a GPU.
    default = benchmark.build_variant(variant, "mlp", 0)
    assert default.jit_compile is False


def test_probed_variant_runs_with_xla(digits):
    x, y = benchmark.batch_of_digits("mlp", 8, digits)
    batches = benchmark.repeated_batch(x, y)
    model = benchmark.build_variant("fast", "mlp", 0, jit_compile="true")
    benchmark._warm_up({"fast": model}, x, y, batches, 1)
    benchmark.run_step("fast", model, batches)
    values = model.read_probe_values()
    assert values["batch_size"] == 8
    assert values["trace"] > 0
    assert math.isfinite(values["condition_number"])


def test_batches_have_unknown_size(digits):
    """The timed step is compiled as `fit` compiles it for a dataset."""
    x, y = benchmark.batch_of_digits("mlp", 8, digits)
    batches = benchmark.repeated_batch(x, y)
    images_spec, labels_spec = batches.element_spec
    assert images_spec.shape.as_list() == [None, 32, 32, 1]
    assert labels_spec.shape.as_list() == [None]
    for _ in range(3):
        images, labels = next(batches)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)


def test_output_path_is_checked(tmp_path):
    nested = tmp_path / "new" / "folder" / "benchmark.json"
    benchmark.check_output_path(str(nested))
    assert nested.parent.is_dir()
    with pytest.raises(ValueError, match="it is a folder"):
        benchmark.check_output_path(str(tmp_path))
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ValueError, match="part of its folder path"):
        benchmark.check_output_path(str(tmp_path / "afile" / "x.json"))


def test_output_path_that_cannot_be_written_is_rejected(tmp_path):
    """The tool writes through `<output>.tmp`; a path where that file cannot
    be created fails before any timing, and leaves nothing behind."""
    output = tmp_path / "benchmark.json"
    benchmark.check_output_path(str(output))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "benchmark.json.tmp").mkdir()
    with pytest.raises(ValueError, match="cannot write .*benchmark.json.tmp"):
        benchmark.check_output_path(str(output))
    assert not output.exists()


def test_memory_pass_counts_small_tensors(digits):
    """The memory pass runs in a process whose allocator counts every
    tensor. In ResNet-8 at batch 2 every tensor is under 256 KiB, which the
    default allocator leaves out, so a peak of zero there would mean the
    pass missed them."""
    settings = {"memory_repeats": 1, "seed": 0, "memory_timeout_seconds": 600}
    peaks = benchmark.memory_in_new_process(
        "resnet8", 2, ["plain", "fast"], settings
    )
    assert set(peaks) == {"plain", "fast"}
    # The first convolution outputs 2 x 32 x 32 x 16 float32 features, 128
    # KiB. BatchNormalization writes as many while it reads them, so at
    # least 256 KiB are held at once.
    for variant, peak in peaks.items():
        assert peak >= 2 * 2 * 32 * 32 * 16 * 4 / 2**20, variant


def test_probe_memory_few_layers(monkeypatch):
    """The probe adds a few layers' per-example gradients to the peak
    memory of a step, not the whole model's. For ResNet-20 at batch 32,
    those of the largest convolution (3 x 3 x 64 x 64 weights) take 4.5
    MiB, and those of the whole model (269,850 weights) 33 MiB. Up to three
    blocks are pending at a time, each with the per-example gradients of a
    layer and a reordered copy of them, hence the bound of six layers.

    The memory process runs one op at a time here, so that the peak does
    not depend on which ops two threads happen to run together. Measured
    that way, the probe added 7.7 to 9.8 MiB in seven processes, and the
    whole-model reference 26 and 73 MiB in two. With two threads the probe
    added 14.5 to 27.5 MiB in eight processes, and once broke this bound.
    """
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")
    settings = {"memory_repeats": 2, "seed": 0, "memory_timeout_seconds": 600}
    peaks = benchmark.memory_in_new_process(
        "resnet20", 32, ["plain", "fast"], settings
    )
    largest_layer_mb = 32 * 3 * 3 * 64 * 64 * 4 / 2**20
    added = peaks["fast"] - peaks["plain"]
    assert added > 0
    assert added <= 6 * largest_layer_mb


def test_memory_process_accepts_jit_compile():
    settings = {
        "memory_repeats": 1, "seed": 0, "memory_timeout_seconds": 600,
        "jit_compile": "true",
    }
    peaks = benchmark.memory_in_new_process("mlp", 2, ["plain"], settings)
    assert set(peaks) == {"plain"}
    assert peaks["plain"] > 0


def test_memory_process_timeout(caplog):
    """A memory process that runs past its time limit is stopped. The cell
    keeps no memory, and the warning names the flag to raise."""
    settings = {"memory_repeats": 1, "seed": 0, "memory_timeout_seconds": 1}
    # Before it measures, the process imports TensorFlow and traces a
    # training step, which took over 10 s on the 2-core test machine.
    peaks = benchmark.memory_in_new_process("mlp", 2, ["plain"], settings)
    assert peaks == {}
    assert "timed out after 1 s and was stopped" in caplog.text
    assert "--memory_timeout_seconds" in caplog.text


def test_allocator_setting_values():
    variable = benchmark.COUNT_ALL_TENSORS[0]
    for value in ("1", "true", "TRUE"):
        assert benchmark.counts_all_tensors({variable: value}), value
    for value in ("0", "false", "", "yes"):
        assert not benchmark.counts_all_tensors({variable: value}), value
    assert not benchmark.counts_all_tensors({})


def test_memory_only_needs_allocator_setting(tmp_path):
    """Run alone, without the allocator setting, --memory_only would give
    the numbers that leave out small tensors, so it exits with status 2 and
    prints how to run the tool."""
    output = tmp_path / "memory.json"
    environment = {
        key: value for key, value in os.environ.items()
        if key != benchmark.COUNT_ALL_TENSORS[0]
    }
    completed = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", "--memory_only",
         "--models=mlp", "--batch_sizes=4", f"--output={output}"],
        check=False, env=environment, cwd=benchmark._REPOSITORY_ROOT,
        capture_output=True, text=True,
    )
    assert completed.returncode == 2
    assert "TF_CPU_ALLOCATOR_USE_BFC=1" in completed.stderr
    assert "without --memory_only" in completed.stderr
    assert not output.exists()


def test_timing_rejects_allocator_setting(tmp_path):
    """The timed steps must run with the default allocator, as training
    does, so the tool rejects an environment that switches every tensor to
    the BFC allocator, before it times anything."""
    output = tmp_path / "benchmark.json"
    variable = benchmark.COUNT_ALL_TENSORS[0]
    for value in ("1", "true"):
        environment = dict(os.environ, **{variable: value})
        completed = subprocess.run(
            [sys.executable, "-m", "tools.benchmark", "--models=mlp",
             "--batch_sizes=4", "--variants=fast", f"--output={output}"],
            check=False, env=environment, cwd=benchmark._REPOSITORY_ROOT,
            capture_output=True, text=True,
        )
        assert completed.returncode == 2, value
        assert f"{variable}={value} is set" in completed.stderr
        assert "Unset it" in completed.stderr
        assert "Timing mlp" not in completed.stderr
        assert not output.exists()


def test_results_page_matches_recorded_run():
    """docs/benchmarks.md shows the table of docs/benchmark_results.json,
    and its range for the step after a probe is that run's."""
    docs = os.path.join(benchmark._REPOSITORY_ROOT, "docs")
    with open(os.path.join(docs, "benchmark_results.json")) as results:
        report = json.load(results)
    with open(os.path.join(docs, "benchmarks.md")) as page:
        text = page.read()
    assert benchmark.format_table(report) in text
    ratios = [
        cell["variants"]["after_probe"]["ratio_to_plain"]
        for cell in report["results"]
    ]
    sentence = (
        f"the step after a probe took {min(ratios):.2f} to "
        f"{max(ratios):.2f} times a plain step"
    )
    # The sentence may wrap onto the next line of the page.
    assert sentence in " ".join(text.split())
