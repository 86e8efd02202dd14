"""Tests of the batch-size policies and of training that applies them."""

import csv
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl.testing import flagsaver
from tensorboard.plugins.hparams import api_pb2

import tf_fisher
from tests import train_test
from tf_fisher import FisherCallback
from tf_fisher import FisherModel
from tf_fisher import adaptive
from tf_fisher import batch_size_policies as policies
from tf_fisher import cli
from tf_fisher import measures
from tf_fisher import run
from tf_fisher import train as train_cli


def decide_each(policy, batch_size, logs_per_epoch):
    """Run `policy` over epochs, applying its decisions; return them."""
    decisions = []
    for epoch, logs in enumerate(logs_per_epoch):
        decision = policy.decide(epoch, batch_size, logs)
        decisions.append(decision)
        batch_size = decision.new_batch_size
    return decisions


def sizes_after(decisions):
    return [decision.new_batch_size for decision in decisions]


# Base behaviour: bounds and minimum epochs per size.


class AlternatingPolicy(policies.BatchSizePolicy):
    """Asks for double the size at even epochs and half at odd ones, the
    worst case for oscillation."""

    name = "alternating"

    def propose(self, epoch, batch_size, logs, samples):
        size = 2 * batch_size if epoch % 2 == 0 else batch_size // 2
        return size, "alternate", {}


def test_min_epochs_per_size_limits_changes():
    policy = AlternatingPolicy(
        min_batch_size=8, max_batch_size=1024, min_epochs_per_size=3
    )
    decisions = decide_each(policy, 64, [{}] * 9)
    actions = [decision.action for decision in decisions]
    # A change every epoch is asked for, but each size runs 3 epochs.
    assert actions == [
        "hold", "hold", "grow", "hold", "hold", "shrink", "hold", "hold",
        "grow",
    ]
    assert sizes_after(decisions) == [
        64, 64, 128, 128, 128, 64, 64, 64, 128,
    ]
    assert "held because batch size 64 has run 1 of" in decisions[0].reason


def test_proposals_are_clipped_to_bounds():
    policy = AlternatingPolicy(
        min_batch_size=32, max_batch_size=64, min_epochs_per_size=1
    )
    decisions = decide_each(policy, 64, [{}] * 4)
    # Double of 64 is clipped to 64 (keep); half of 64 is 32 (shrink);
    # double of 32 is 64 (grow); half of 64 is 32.
    assert sizes_after(decisions) == [64, 32, 64, 32]
    assert decisions[0].action == "keep"
    assert all(32 <= size <= 64 for size in sizes_after(decisions))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"min_epochs_per_size": 0}, "min_epochs_per_size"),
        ({"min_batch_size": 64, "max_batch_size": 32}, "larger than"),
    ],
)
def test_invalid_bounds_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        AlternatingPolicy(**arguments)


@pytest.mark.parametrize(
    "batch_size, target, expected",
    [
        (32, 32.0, 32),
        (32, 60.0, 32),  # log2 ratio 0.91 < 1: inside the hysteresis band
        (32, 64.0, 64),
        (32, 100.0, 128),  # log2 ratio 1.64 rounds to 2
        (32, 15.0, 16),
        (32, 17.0, 32),
        (32, math.nan, 32),
        (32, -5.0, 32),
    ],
)
def test_power_of_two_step(batch_size, target, expected):
    assert policies.power_of_two_step(batch_size, target) == expected


# Norm test.


def test_norm_test_grows_when_noisy():
    policy = policies.NormTestPolicy(
        theta=0.5, max_batch_size=1024, min_epochs_per_size=1
    )
    decision = policy.decide(0, 32, {"norm_test_ratio": 0.9})
    # Byrd et al.: 32 * 0.9 / 0.25 = 115.2 examples, rounded up to 128.
    assert decision.action == "grow"
    assert decision.new_batch_size == 128
    assert decision.values["required_batch_size"] == pytest.approx(115.2)
    assert decision.values["norm_test_ratio"] == 0.9
    assert "norm test failed" in decision.reason


def test_norm_test_keeps_when_passed_and_never_shrinks():
    policy = policies.NormTestPolicy(theta=0.9, min_epochs_per_size=1)
    decisions = decide_each(
        policy, 64, [{"norm_test_ratio": value} for value in (0.1, 0.5, 0.8)]
    )
    assert sizes_after(decisions) == [64, 64, 64]
    assert all(decision.action == "keep" for decision in decisions)


def test_norm_test_respects_max_and_undefined():
    policy = policies.NormTestPolicy(
        theta=0.1, max_batch_size=256, min_epochs_per_size=1
    )
    decisions = decide_each(
        policy, 32,
        [{"norm_test_ratio": 0.9}, {"norm_test_ratio": 0.9},
         {"norm_test_ratio": math.nan}],
    )
    assert sizes_after(decisions) == [256, 256, 256]
    assert decisions[1].action == "keep"
    assert decisions[2].reason == "norm test ratio undefined this epoch"


@pytest.mark.parametrize("theta", [0.0, 1.0, -0.5])
def test_norm_test_invalid_theta(theta):
    with pytest.raises(ValueError, match="theta"):
        policies.NormTestPolicy(theta=theta)


# Noise scale.


def noise_logs(variance, signal):
    return {
        "gradient_variance": variance,
        "unbiased_gradient_sq_norm": signal,
        "noise_scale": variance / signal if signal > 0 else math.nan,
    }


def test_noise_scale_follows_smoothed_estimate():
    policy = policies.NoiseScalePolicy(
        smoothing=0.5, max_batch_size=1024, min_epochs_per_size=1
    )
    first = policy.decide(0, 32, noise_logs(400.0, 1.0))
    assert first.values["smoothed_noise_scale"] == pytest.approx(400.0)
    assert first.new_batch_size == 512  # log2(400 / 32) = 3.6 rounds to 4
    second = policy.decide(1, 512, noise_logs(200.0, 3.0))
    # Averages: variance 0.5 * 400 + 0.5 * 200 = 300, signal 2.
    assert second.values["smoothed_noise_scale"] == pytest.approx(150.0)
    assert second.new_batch_size == 128  # log2(150 / 512) = -1.77


def test_noise_scale_hysteresis_prevents_oscillation():
    policy = policies.NoiseScalePolicy(smoothing=0.0, min_epochs_per_size=1)
    # The target wanders between 0.75 and 1.4 times the batch size.
    logs = [noise_logs(scale, 1.0) for scale in (90, 48, 85, 50, 88, 49)]
    decisions = decide_each(policy, 64, logs)
    assert sizes_after(decisions) == [64] * 6


def test_noise_scale_multiplier_and_bounds():
    policy = policies.NoiseScalePolicy(
        multiplier=0.25, smoothing=0.0, min_batch_size=16,
        max_batch_size=128, min_epochs_per_size=1,
    )
    decisions = decide_each(
        policy, 32, [noise_logs(4096.0, 1.0), noise_logs(8.0, 1.0)]
    )
    # 0.25 * 4096 = 1024 is clipped to 128; 0.25 * 8 = 2 is clipped to 16.
    assert sizes_after(decisions) == [128, 16]
    assert decisions[0].values["target_batch_size"] == pytest.approx(1024.0)


def test_noise_scale_undefined_keeps_size():
    policy = policies.NoiseScalePolicy(min_epochs_per_size=1)
    decision = policy.decide(0, 32, noise_logs(10.0, -2.0))
    assert decision.action == "keep"
    assert "undefined" in decision.reason


# Measure-guided.


def test_predicted_energy_matches_running_measures():
    # Epoch 1 at batch 32: 125 steps, probes every 10 steps (13 probes).
    running = measures.RunningMeasures()
    for step in range(125):
        if step % 10 == 0:
            running.add_sample(100.0, 0.2)
        running.add_iterations()
    predicted = policies.predict_cumulative_energy(
        mean_energy=0.2, batch_size=32, new_batch_size=128,
        num_examples=4000, fisher_interval=10, rate_ratio=0.1,
        **{key: running.state()[key]
           for key in ("energy_sum", "num_iterations", "num_samples")},
    )
    # Epoch 2 at batch 128: 32 steps, 4 probes of energy
    # 0.2 * 0.1 * sqrt(32 / 128).
    for step in range(32):
        if step % 10 == 0:
            running.add_sample(100.0, 0.2 * 0.1 * 0.5)
        running.add_iterations()
    assert predicted == pytest.approx(running.cumulative_energy)


def flat_target(num_epochs, condition=(100.0, 200.0), energy=(5.0, 6.0)):
    return policies.TargetTrajectory(
        condition_low=np.full(num_epochs, condition[0]),
        condition_high=np.full(num_epochs, condition[1]),
        energy_low=np.full(num_epochs, energy[0]),
        energy_high=np.full(num_epochs, energy[1]),
        source="test",
    )


def measure_logs(condition, energy, energy_sum, iterations, samples):
    return {
        "mean_condition_number": condition,
        "cumulative_fisher_energy": energy,
        "energy_sum": energy_sum,
        "num_iterations": iterations,
        "num_samples": samples,
        "num_examples": 1000,
        "fisher_interval": 1,
        "learning_rate": 0.1,
        "next_learning_rate": 0.1,
    }


def probes(energy):
    return [{"fisher_energy": energy}]


def measure_policy(**target):
    return policies.MeasureGuidedPolicy(
        flat_target(4, **target), min_batch_size=16, max_batch_size=256,
        min_epochs_per_size=1,
    )


def test_measure_grows_when_energy_runs_ahead():
    # L_K = 3 after 10 probes; one more epoch at 64 (16 probes of 0.2)
    # would reach 6.2, above the band [5, 6]; at 128, 8 probes of
    # 0.2 / sqrt(2) give about 4.13, below the band by log(5 / 4.13) = 0.19,
    # against log(6.2 / 6) = 0.03 for keeping. Keeping is nearer.
    policy = measure_policy()
    logs = measure_logs(150.0, 3.0, 3.0, 10, 10)
    decision = policy.decide(0, 64, logs, probes(0.2))
    assert decision.action == "keep"
    # With probe energy 0.3 keeping reaches 7.8, 128 about 4.70 and 256
    # (4 probes of 0.15) 3.6.
    decision = policy.decide(1, 64, logs, probes(0.3))
    assert decision.action == "grow"
    assert decision.new_batch_size == 128
    assert decision.values["predicted_energy"] == pytest.approx(
        3.0 + 8 * 0.3 / math.sqrt(2)
    )


def test_measure_shrinks_when_energy_lags():
    policy = measure_policy()
    # Keeping adds 16 probes of 0.05 (L_K 3.8). Batch 32 adds 32 probes of
    # 0.05 * sqrt(2), reaching about 5.26, inside the band, and batch 16
    # adds 63 probes of 0.1 (9.3).
    decision = policy.decide(
        0, 64, measure_logs(150.0, 3.0, 3.0, 10, 10), probes(0.05)
    )
    assert decision.action == "shrink"
    assert decision.new_batch_size == 32


def test_measure_keeps_inside_band():
    policy = measure_policy(energy=(3.5, 4.5))
    decision = policy.decide(
        0, 64, measure_logs(150.0, 3.0, 3.0, 10, 10), probes(0.05)
    )
    assert decision.action == "keep"
    assert decision.values["energy_low"] == 3.5


def test_measure_candidates_span_bounds():
    policy = policies.MeasureGuidedPolicy(
        flat_target(2), min_batch_size=24, max_batch_size=200
    )
    assert policy._candidates(50) == [24, 25, 50, 100, 200]


def test_measure_energy_outranks_condition():
    policy = measure_policy()
    # C_K = 20 is far below its band [100, 200], which calls for a larger
    # batch, but L_K lags far behind its band [5, 6]: batch 64 predicts
    # 3.16, 32 about 3.45 and 16 (63 probes of 0.02) 4.26, so the policy
    # shrinks to the smallest size in one step.
    decision = policy.decide(
        0, 64, measure_logs(20.0, 3.0, 3.0, 10, 10), probes(0.01)
    )
    assert decision.action == "shrink"
    assert decision.new_batch_size == 16
    assert decision.values["predicted_energy"] == pytest.approx(4.26)


def test_measure_shrinks_for_condition_when_energy_allows():
    policy = measure_policy(energy=(3.0, 9.0))
    # Both 64 and 32 keep L_K inside [3, 9] (3.8 and 5.26; 16 reaches 9.3);
    # C_K = 500 is above its band, so the smaller batch is preferred.
    decision = policy.decide(
        0, 64, measure_logs(500.0, 3.0, 3.0, 10, 10), probes(0.05)
    )
    assert decision.new_batch_size == 32


def test_target_from_region_scales_energy_by_learning_rate():
    target = policies.TargetTrajectory.from_region((10, 20), (1.0, 2.0), 4)
    # Learning rates 1, 1, 0.1, 0.01 (drops at 50% and 75% of 4 epochs).
    share = np.cumsum([1, 1, 0.1, 0.01]) / 2.11
    np.testing.assert_allclose(target.energy_low, share)
    np.testing.assert_allclose(target.energy_high, 2 * share)
    np.testing.assert_allclose(target.condition_low, [10] * 4)
    assert target.energy_high[-1] == pytest.approx(2.0)


def write_epochs(folder, conditions, energies):
    folder.mkdir()
    with open(folder / "epochs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "mean_condition_number",
                         "cumulative_fisher_energy"])
        for index, (condition, energy) in enumerate(zip(conditions, energies)):
            writer.writerow([index + 1, condition, energy])
    return str(folder)


def test_target_from_beacons_spans_runs(tmp_path):
    first = write_epochs(tmp_path / "a", [100, 110], [1.0, 2.0])
    second = write_epochs(tmp_path / "b", [120, 100], [1.5, 1.8])
    target = policies.TargetTrajectory.from_runs(
        [first, second], 2, tolerance=0.1
    )
    np.testing.assert_allclose(target.condition_low, [100 / 1.1, 100 / 1.1])
    np.testing.assert_allclose(target.condition_high, [132.0, 121.0])
    np.testing.assert_allclose(target.energy_low, [1 / 1.1, 1.8 / 1.1])
    np.testing.assert_allclose(target.energy_high, [1.65, 2.2])


def test_target_from_beacons_rejects_bad_runs(tmp_path):
    short = write_epochs(tmp_path / "short", [100], [1.0])
    with pytest.raises(ValueError, match="has 1 epochs"):
        policies.TargetTrajectory.from_runs([short], 2)
    with pytest.raises(ValueError, match="no epochs.csv"):
        policies.TargetTrajectory.from_runs([str(tmp_path / "none")], 2)
    with pytest.raises(ValueError, match="empty"):
        policies.TargetTrajectory.from_runs([], 2)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"name": "bogus"}, "Invalid adaptive policy 'bogus'"),
        ({"name": "measure"}, "needs a target"),
        (
            {"name": "measure", "beacon_dirs": ["x"],
             "condition_range": (1, 2), "energy_range": (1, 2)},
            "not both",
        ),
        (
            {"name": "measure", "condition_range": (2, 1),
             "energy_range": (1, 2)},
            "condition_range",
        ),
    ],
)
def test_make_policy_rejects_bad_input(arguments, message):
    with pytest.raises(ValueError, match=message):
        policies.make_policy(num_epochs=4, **arguments)


# Training with a policy.


def tiny_fisher_model():
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    model = FisherModel(network, fisher_interval=1)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_fit_adaptive_rebuilds_pipeline(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=32).astype(np.int32)
    model = tiny_fisher_model()
    fisher = FisherCallback()
    # θ = 0.05 fails on any noisy batch, so the size grows to the bound.
    policy = policies.NormTestPolicy(
        theta=0.05, min_batch_size=4, max_batch_size=16,
        min_epochs_per_size=2,
    )
    callback = adaptive.AdaptiveBatchSize(
        policy, 4, 4, fisher=fisher, output_dir=str(tmp_path)
    )
    built = []

    def make_dataset(batch_size, first_epoch):
        built.append((batch_size, first_epoch))
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)

    segments = adaptive.fit_adaptive(
        model, make_dataset, callback, 4, [fisher], shuffle=False,
        verbose=0,
    )
    assert built == [(4, 0), (16, 2)]
    assert [s["batch_size"] for s in segments] == [4, 16]
    assert [(s["first_epoch"], s["last_epoch"]) for s in segments] == [
        (1, 2), (3, 4),
    ]
    # The probes record the batch size that each epoch really used.
    sizes = {(row["epoch"], row["batch_size"]) for row in fisher.samples}
    assert sizes == {(1, 4), (2, 4), (3, 16), (4, 16)}
    # One optimizer state across both fits: 8 + 8 + 2 + 2 steps.
    assert int(model.optimizer.iterations.numpy()) == 20
    assert fisher.running.num_iterations == 20
    # Decisions after epochs 1-3; none after the last.
    assert [d.action for d in callback.decisions] == ["hold", "grow", "keep"]
    with open(tmp_path / "decisions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["new_batch_size"] for row in rows] == ["4", "16", "16"]
    assert float(rows[1]["norm_test_ratio"]) > 0.05**2


class _RecordingNormTest(policies.NormTestPolicy):
    """The norm-test policy, also recording the example count it is given."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_examples = []

    def decide(self, epoch, batch_size, logs, samples=()):
        self.num_examples.append(logs["num_examples"])
        return super().decide(epoch, batch_size, logs, samples)


def test_fit_adaptive_on_dataset_of_unknown_length():
    """A generator dataset has no known length, so Keras gives no step
    count. The callback counts the steps of each epoch itself and gives the
    policy their number times the batch size: 32 examples in batches of
    4 are 8 steps, then in batches of 16, 2 steps."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=32).astype(np.int32)
    model = tiny_fisher_model()
    fisher = FisherCallback()
    policy = _RecordingNormTest(
        theta=0.05, min_batch_size=4, max_batch_size=16,
        min_epochs_per_size=1,
    )
    # Through the package's public names, as the README shows them.
    callback = tf_fisher.AdaptiveBatchSize(policy, 4, 3, fisher=fisher)

    def make_dataset(batch_size, first_epoch):
        def batches():
            for start in range(0, 32, batch_size):
                yield x[start:start + batch_size], y[start:start + batch_size]

        return tf.data.Dataset.from_generator(
            batches,
            output_signature=(
                tf.TensorSpec([None, 5], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ),
        )

    tf_fisher.fit_adaptive(
        model, make_dataset, callback, 3, callbacks=[fisher], verbose=0
    )
    assert [d.new_batch_size for d in callback.decisions] == [16, 16]
    assert policy.num_examples == [32, 32]


def test_callback_requires_fisher_for_measure_policy():
    policy = policies.MeasureGuidedPolicy(flat_target(3))
    with pytest.raises(ValueError, match="FisherCallback"):
        adaptive.AdaptiveBatchSize(policy, 32, 3)


def read_rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_cli_adaptive_run_changes_batch_size(tmp_path):
    output_dir = tmp_path / "run"
    argv = [
        "train", f"--output_dir={output_dir}", "--adaptive=norm_test",
        "--norm_test_theta=0.1", "--batch_size=64", "--min_batch_size=64",
        "--max_batch_size=256", "--min_epochs_per_size=1", "--epochs=3",
        "--fisher_interval=10",
    ]
    with flagsaver.flagsaver():
        cli.parse_flags(argv)
        status = train_cli.main(["train"])
    assert status == 0
    epochs = read_rows(output_dir / "epochs.csv")
    used = [int(row["batch_size"]) for row in epochs]
    assert used[0] == 64
    assert used[1] > 64
    assert used == sorted(used)  # the norm test never shrinks the batch
    # The probes of each epoch ran at that epoch's batch size.
    for row in read_rows(output_dir / "samples.csv"):
        assert int(row["batch_size"]) == used[int(row["epoch"]) - 1]
    decisions = read_rows(output_dir / "decisions.csv")
    assert len(decisions) == 2
    assert int(decisions[0]["new_batch_size"]) == used[1]
    with open(output_dir / "summary.json") as file:
        summary = json.load(file)
    assert summary["batch_sizes"] == used
    assert summary["adaptive"]["policy"] == "norm_test"
    assert summary["config"]["schedule"] == "adaptive-norm_test"
    steps = sum(math.ceil(4000 / size) for size in used)
    assert summary["measures"]["num_iterations"] == steps
    assert float(epochs[-1]["num_iterations"]) == steps
    start, end = recorded_session(output_dir / "tensorboard")
    hparams = {
        name: getattr(item, item.WhichOneof("kind"))
        for name, item in start.hparams.items()
    }
    assert hparams["schedule"] == "adaptive-norm_test"
    assert hparams["batch_size"] == 64
    assert end.status == api_pb2.STATUS_SUCCESS


def recorded_session(folder):
    """Return the HParams session start and end messages in the
    TensorBoard event files of `folder`."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata

    parsers = {
        metadata.SESSION_START_INFO_TAG:
            metadata.parse_session_start_info_plugin_data,
        metadata.SESSION_END_INFO_TAG:
            metadata.parse_session_end_info_plugin_data,
    }
    found = {}
    for path in sorted(folder.glob("events.out.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag in parsers:
                    found[value.tag] = parsers[value.tag](
                        value.metadata.plugin_data.content
                    )
    assert set(found) == set(parsers), f"HParams session in {folder}"
    return (
        found[metadata.SESSION_START_INFO_TAG],
        found[metadata.SESSION_END_INFO_TAG],
    )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--adaptive=norm_test", "--schedule=s32-to-512"], "--adaptive"),
        (["--adaptive=measure"], "needs a target"),
        (
            ["--adaptive=measure", "--target_fisher_energy=1,x",
             "--target_condition_number=1,2"],
            "--target_fisher_energy",
        ),
        (["--adaptive=norm_test", "--max_batch_size=8000"], "max_batch_size"),
        (["--adaptive=norm_test", "--batch_size=8"], "outside the policy"),
    ],
)
def test_cli_adaptive_bad_input(arguments, message, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["train", f"--output_dir={output_dir}", "--epochs=5", *arguments]
    with flagsaver.flagsaver():
        cli.parse_flags(argv)
        status = train_cli.main(["train"])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


# The study that compares policies with fixed sizes and schedules.


def study_row(name, kind, error, p_value, steps, seconds):
    return {
        "configuration": name, "kind": kind, "batch_sizes": "",
        "test_error_mean": error, "test_error_std": 0.002,
        "p_value": p_value, "steps_mean": steps,
        "wall_seconds_mean": seconds, "wall_seconds_std": 0.1,
    }


def test_study_verdict_needs_match_and_saving():
    from experiments import adaptive_study as study

    best = study.Configuration("s32", study.FIXED)
    rows = [
        study_row("s32", study.FIXED, 0.050, math.nan, 1000, 10.0),
        # Lower mean error with half the steps: a match that saves steps.
        study_row("adaptive-a", study.ADAPTIVE, 0.049, 0.6, 500, 12.0),
        # Significantly worse error, even though far cheaper.
        study_row("adaptive-b", study.ADAPTIVE, 0.080, 0.01, 100, 2.0),
        # A match, same steps, and 15% less wall time: within the margin.
        study_row("adaptive-c", study.ADAPTIVE, 0.052, 0.3, 1000, 8.5),
    ]
    lines = study.verdict_lines(rows, best)
    assert lines[0].startswith("Best fixed batch size: s32, test error 5.00")
    assert "adaptive-a: test error 4.90 ± 0.20% (Welch p = 0.6; matches)" in (
        lines[2]
    )
    assert "500 steps (0.50x)" in lines[2]
    assert "does not match" in lines[3]
    assert "(0.85x)" in lines[4]
    assert (
        "Matching the best fixed size with fewer steps or less wall time: "
        "adaptive-a." in lines
    )


def test_study_runs_end_to_end(tmp_path, digits):
    from experiments import adaptive_study as study

    settings = {
        "epochs": 2, "seeds": [0, 1], "fixed_sizes": [256, 512],
        "schedules": [], "policies": ["measure"],
        "learning_rate": 0.05, "fisher_interval": 5,
        "min_epochs_per_size": 1, "norm_test_theta": 0.9,
        "measure_first_batch_size": 0, "noise_scale_multiplier": 1.0,
    }
    lines = study.run_study(settings, str(tmp_path), warm_up_first=False)
    with open(tmp_path / "adaptive_table.csv", newline="") as file:
        rows = {row["configuration"]: row for row in csv.DictReader(file)}
    assert sorted(rows) == ["adaptive-measure", "s256", "s512"]
    assert rows["s512"]["steps_mean"] == "16.0"  # 8 steps x 2 epochs
    assert all(row["num_seeds"] == "2" for row in rows.values())
    assert (tmp_path / "adaptive_trajectories.png").stat().st_size > 0
    assert lines[0].startswith("Best fixed batch size: s")
    # The measure policy's beacons are the best fixed size's two runs.
    grid = tmp_path / "mnist5k_mlp_e2_adaptive"
    with open(grid / "adaptive-measure_lr0.05_seed0" / "config.json") as file:
        beacons = json.load(file)["adaptive"]["target"]
    best = lines[0].split(":")[1].split(",")[0].strip()
    assert beacons.count(f"{best}_lr0.05_seed") == 2
    # A second call reuses every finished run instead of training again.
    before = os.path.getmtime(grid / "s256_lr0.05_seed0" / "summary.json")
    study.run_study(settings, str(tmp_path), warm_up_first=False)
    after = os.path.getmtime(grid / "s256_lr0.05_seed0" / "summary.json")
    assert before == after


def test_study_welch_p_value():
    from scipy import stats

    from experiments import adaptive_study as study

    first, second = [0.05, 0.052, 0.047], [0.06, 0.065]
    expected = stats.ttest_ind(first, second, equal_var=False).pvalue
    assert study.welch_p_value(first, second) == pytest.approx(expected)
    assert math.isnan(study.welch_p_value([0.05], second))
    assert math.isnan(study.welch_p_value([0.05, 0.05], [0.04, 0.04]))


def test_adaptive_run_rejects_bad_seed(tmp_path):
    """An adaptive run checks the options of its configuration, the seed
    among them, before it writes anything."""
    config = run.RunConfig(
        epochs=1, batch_sizes=(32,), seed=-1,
        output_dir=str(tmp_path / "run"),
    )
    policy = policies.make_policy("norm_test", 1)
    with pytest.raises(ValueError, match="Received: seed=-1"):
        adaptive.train_adaptive(config, policy)
    assert not (tmp_path / "run").exists()


def run_study(*arguments):
    """Run `python -m experiments.adaptive_study` with `arguments` from the
    repository root and return the `CompletedProcess`."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.adaptive_study", *arguments],
        check=False, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def test_stale_warm_up_folders_removed(tmp_path):
    """A study killed during its warm-up epoch leaves that run's folder;
    the next study removes it, and keeps a folder with a user's file."""
    from experiments import adaptive_study as study

    stale = tmp_path / "warm_up_k3x9q2ab"
    (stale / "tensorboard").mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    run_folder = tmp_path / "s64_lr0.05_seed0"
    run_folder.mkdir()
    study.remove_stale_warm_ups(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["s64_lr0.05_seed0"]

    mine = tmp_path / "warm_up_notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        study.remove_stale_warm_ups(str(tmp_path))
    assert (mine / "notes.txt").read_text() == "mine"


def test_study_failed_write_names_folder(tmp_path):
    """A study whose files cannot grow, as on a full disk, exits with
    status 1 and one message that names the folder, not a traceback."""
    output_dir = tmp_path / "study"
    result = subprocess.run(
        [
            sys.executable, "-m", "experiments.adaptive_study",
            f"--output_dir={output_dir}", "--epochs=5", "--seeds=0",
            "--fixed_sizes=64,256", "--schedules=s64-to-256",
            "--policies=norm_test",
        ],
        check=False, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        preexec_fn=train_test.limit_file_size,
    )
    assert result.returncode == 1, result.stderr
    assert (
        f"Error: the study could not write its records in {output_dir}"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_study_rejects_empty_size_list(tmp_path):
    """An empty --fixed_sizes is named, exits with status 2, and leaves no
    warm-up folder behind."""
    output_dir = tmp_path / "study"
    result = run_study(f"--output_dir={output_dir}", "--fixed_sizes=")
    assert result.returncode == 2, result.stderr
    assert "Invalid --fixed_sizes=: expected integers" in result.stderr
    assert not output_dir.exists() or os.listdir(output_dir) == []


def test_study_rejects_batch_size_above_training_set(tmp_path):
    """A fixed size above the 4,000 training digits stops the study with
    status 2 and one error naming the size, the training-set size and the
    flag to change, before the warm-up epoch or any folder."""
    output_dir = tmp_path / "study"
    result = run_study(f"--output_dir={output_dir}", "--fixed_sizes=32,8000")
    assert result.returncode == 2, result.stderr
    # TensorFlow's start-up lines may come first.
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid batch size 8000 in grid 'mnist5k_mlp_e20_adaptive' "
        "(run s8000_lr0.05_seed0): the training set of 'mnist5k' has only "
        "4000 examples. Lower --fixed_sizes to at most 4000."
    )
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()


def test_study_rejects_first_size_out_of_range(tmp_path):
    """A first size of the measure policy above the largest fixed size,
    here also above the 4,000 training digits, stops the study with
    status 2 before anything is written."""
    output_dir = tmp_path / "study"
    result = run_study(
        f"--output_dir={output_dir}", "--measure_first_batch_size=8000"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: Invalid --measure_first_batch_size=8000: the measure policy "
        "chooses sizes from 32 to 512, the range of --fixed_sizes. Set it "
        "within that range, or to 0 for 512."
    )
    assert not output_dir.exists()


def test_study_stops_when_every_fixed_size_diverges(tmp_path):
    """At a learning rate that overflows, every fixed run diverges. The
    study names them and the fix instead of taking a diverged run as the
    measure policy's beacon; the diverged runs stay on disk."""
    from experiments import adaptive_study as study

    settings = {
        "epochs": 1, "seeds": [0], "fixed_sizes": [512],
        "schedules": [], "policies": ["measure"],
        "learning_rate": 1e6, "fisher_interval": 4,
        "min_epochs_per_size": 1, "norm_test_theta": 0.9,
        "measure_first_batch_size": 0, "noise_scale_multiplier": 1.0,
    }
    with pytest.raises(ValueError) as error:
        study.run_study(settings, str(tmp_path), warm_up_first=False)
    assert str(error.value) == (
        "Every fixed batch size has diverged runs at learning rate 1e+06: "
        "s512 (1 of 1). The study needs a fixed size without diverged runs "
        "as its reference. Lower --learning_rate, for example to "
        "--learning_rate=100000."
    )
    folder = tmp_path / "mnist5k_mlp_e1_adaptive" / "s512_lr1e+06_seed0"
    assert run.read_summary(str(folder))["status"] == "diverged"
    assert not (tmp_path / "mnist5k_mlp_e1_adaptive"
                / "adaptive-measure_lr1e+06_seed0").exists()


def test_mean_trajectory_leaves_out_short_runs(tmp_path):
    """A run that stopped after one epoch, as a diverged one does, is left
    out of the geometric mean, not used to cut the others short."""
    from experiments import adaptive_study

    histories = {
        "a": [(10.0, 1.0), (20.0, 2.0), (40.0, 4.0)],
        "b": [(1000.0, 100.0), (2000.0, 200.0), (4000.0, 400.0)],
        "diverged": [(5.0, 1e9)],
    }
    folders = []
    for name, rows in histories.items():
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "epochs.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["mean_condition_number", "cumulative_fisher_energy"])
            writer.writerows(rows)
        folders.append(str(folder))
    conditions, energies, count = adaptive_study._mean_trajectory(folders)
    assert count == 2
    np.testing.assert_allclose(conditions, [100.0, 200.0, 400.0])
    np.testing.assert_allclose(energies, [10.0, 20.0, 40.0])
