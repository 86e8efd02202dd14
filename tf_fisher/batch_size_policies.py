"""Batch-size policies that pick each epoch's batch size from the measures.

A policy reads the epoch that has just ended: its logs, with C̄_K, L_K and
the epoch averages of the gradient statistics, and its probes. It returns a
`Decision` to keep the batch size or to change it for the next epoch.
`tf_fisher.adaptive` applies the decisions during training.

Three policies share the bounds `[min_batch_size, max_batch_size]` and a
minimum number of epochs at each batch size, so the size cannot flip back
and forth from one epoch to the next:

* `MeasureGuidedPolicy` keeps the run's (C̄_K, L_K) near a target
  trajectory, taken from beacon runs or from a target region, as Liao,
  Drummond, Reid and Carneiro, "Approximate Fisher Information Matrix to
  Characterise the Training of Deep Neural Networks", IEEE TPAMI 2020,
  suggest for tuning the batch size during training.
* `NormTestPolicy` grows the batch size when the norm test of Byrd, Chin,
  Nocedal and Wu, "Sample Size Selection in Optimization Methods for
  Machine Learning", Mathematical Programming 2012, fails.
* `NoiseScalePolicy` follows the simple gradient noise scale B_simple of
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch
  Training", 2018.
"""

import csv
import dataclasses
import math
import os

import numpy as np

from tf_fisher import schedules

POLICY_NAMES = ("measure", "norm_test", "noise_scale")

# Columns of decisions.csv before the policy's own `value_keys`.
DECISION_COLUMNS = (
    "epoch",
    "batch_size",
    "new_batch_size",
    "action",
    "proposed_batch_size",
    "reason",
)


@dataclasses.dataclass(frozen=True)
class Decision:
    """A policy's choice at the end of one epoch.

    Attributes:
        epoch: the 1-based epoch that has just ended.
        batch_size: the batch size of that epoch.
        new_batch_size: the batch size of the next epoch.
        action: "grow", "shrink", "keep", or "hold" (the rule asked for a
            change that the minimum epochs per size deferred).
        proposed_batch_size: the size the rule asked for, within the bounds.
        reason: one sentence naming the rule and the values behind it.
        values: the numbers behind the decision, keyed by the policy's
            `value_keys`.
    """

    epoch: int
    batch_size: int
    new_batch_size: int
    action: str
    proposed_batch_size: int
    reason: str
    values: dict

    def row(self):
        """Return the decision as a flat dict for decisions.csv."""
        row = {key: getattr(self, key) for key in DECISION_COLUMNS}
        row.update(self.values)
        return row


class BatchSizePolicy:
    """Base class: bounds, minimum epochs per size and the decision record.

    A subclass implements `propose`; `decide` clips the proposal to the
    bounds and defers a change until the current size has run for
    `min_epochs_per_size` epochs.

    Args:
        min_batch_size: smallest batch size the policy may choose.
        max_batch_size: largest batch size the policy may choose.
        min_epochs_per_size: epochs a batch size runs before the policy may
            change it (the first size included).
    """

    name = "base"
    # Keys of `Decision.values`, which become decisions.csv columns.
    value_keys = ()
    # Whether `decide` needs the FisherCallback's probes and running sums.
    needs_probes = False

    def __init__(self, min_batch_size=16, max_batch_size=512,
                 min_epochs_per_size=2):
        _check_positive_int("min_batch_size", min_batch_size)
        _check_positive_int("max_batch_size", max_batch_size)
        _check_positive_int("min_epochs_per_size", min_epochs_per_size)
        if min_batch_size > max_batch_size:
            raise ValueError(
                "Invalid batch-size bounds: min_batch_size="
                f"{min_batch_size} is larger than max_batch_size="
                f"{max_batch_size}. Swap them or widen the range."
            )
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.min_epochs_per_size = min_epochs_per_size
        self._current_size = None
        self._epochs_at_size = 0

    def describe(self):
        """Return the policy's name and parameters, for config.json."""
        return {
            "policy": self.name,
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
            "min_epochs_per_size": self.min_epochs_per_size,
        }

    def clip(self, batch_size):
        """Return `batch_size` clipped to the bounds, as an int."""
        return int(min(max(batch_size, self.min_batch_size),
                       self.max_batch_size))

    def propose(self, epoch, batch_size, logs, samples):
        """Return (proposed batch size, reason, values) for the next epoch.

        Called once at the end of every epoch, so a policy may keep state.
        """
        raise NotImplementedError

    def decide(self, epoch, batch_size, logs, samples=()):
        """Choose the batch size of the epoch after `epoch`.

        Args:
            epoch: 0-based index of the epoch that has just ended.
            batch_size: the batch size that epoch used.
            logs: the epoch logs, with C̄_K (`mean_condition_number`), L_K
                (`cumulative_fisher_energy`) and the epoch averages of the
                gradient statistics; `learning_rate` and
                `next_learning_rate` when known.
            samples: the per-probe rows of that epoch (dicts keyed by
                `tf_fisher.callbacks.SAMPLE_COLUMNS`).

        Returns:
            A `Decision`.
        """
        if batch_size != self._current_size:
            self._current_size = batch_size
            self._epochs_at_size = 0
        self._epochs_at_size += 1
        proposed, reason, values = self.propose(
            epoch, batch_size, logs, samples
        )
        proposed = self.clip(proposed)
        new_size = proposed
        if proposed == batch_size:
            action = "keep"
        elif self._epochs_at_size < self.min_epochs_per_size:
            action = "hold"
            new_size = batch_size
            reason = (
                f"{reason}; held because batch size {batch_size} has run "
                f"{self._epochs_at_size} of its minimum "
                f"{self.min_epochs_per_size} epochs"
            )
        else:
            action = "grow" if proposed > batch_size else "shrink"
            self._current_size = proposed
            self._epochs_at_size = 0
        return Decision(
            epoch=epoch + 1,
            batch_size=batch_size,
            new_batch_size=new_size,
            action=action,
            proposed_batch_size=proposed,
            reason=reason,
            values={key: values.get(key, math.nan) for key in self.value_keys},
        )


def power_of_two_step(batch_size, target, hysteresis=1.0):
    """Move `batch_size` towards `target` by a power of two.

    Returns `batch_size * 2**k`, with k the integer nearest to
    log2(target / batch_size), when that logarithm is at least `hysteresis`
    in size; otherwise `batch_size`. With hysteresis 1 the size changes only
    when the target is at least twice or at most half the current size, so
    a target that wanders around 1.4 times the size does not flip it.
    """
    if not (math.isfinite(target) and target > 0):
        return batch_size
    exponent = math.log2(target / batch_size)
    if abs(exponent) < hysteresis:
        return batch_size
    return int(batch_size * 2.0 ** round(exponent))


class NormTestPolicy(BatchSizePolicy):
    """Grows the batch size when the norm test of Byrd et al. 2012 fails.

    The test accepts the batch gradient ḡ when tr Σ̂ / B <= θ² ‖ḡ‖², that is
    when `norm_test_ratio` = tr Σ̂ / (B ‖ḡ‖²) is at most θ²; otherwise Byrd,
    Chin, Nocedal and Wu ("Sample Size Selection in Optimization Methods for
    Machine Learning", 2012) ask for B · ratio / θ² examples. This policy
    uses the epoch average of the ratio and rounds the requested size up to
    a power-of-two multiple of the current one. It never shrinks the batch.

    Since E[tr Σ̂] = tr Σ and E[‖ḡ‖²] = |G|² + tr Σ / B, the ratio is about
    B_simple / (B + B_simple), below 1, and the test passes once
    B >= B_simple (1 − θ²) / θ²: about B_simple / 4 for θ = 0.9, 3 B_simple
    for θ = 0.5. Byrd et al.'s request B · ratio / θ² assumes that ‖ḡ‖²
    stays the same at the new size, but its noise term tr Σ / B falls. So
    the request falls short of the size that passes: in expectation it is
    below B / θ², which for θ >= 0.71 allows one doubling per decision,
    however far the batch size is below B_simple (1 − θ²) / θ².

    Args:
        theta: θ of the test, in (0, 1). A smaller θ requires a less noisy
            gradient and so larger batches.
        **bounds: `BatchSizePolicy` arguments.
    """

    name = "norm_test"
    value_keys = ("norm_test_ratio", "theta", "required_batch_size")

    def __init__(self, theta=0.9, **bounds):
        super().__init__(**bounds)
        if not 0 < theta < 1:
            raise ValueError(
                f"Invalid theta: expected a number in (0, 1). Received: "
                f"theta={theta}"
            )
        self.theta = float(theta)

    def describe(self):
        return dict(super().describe(), theta=self.theta)

    def propose(self, epoch, batch_size, logs, samples):
        ratio = float(logs.get("norm_test_ratio", math.nan))
        values = {"norm_test_ratio": ratio, "theta": self.theta}
        if not math.isfinite(ratio):
            return batch_size, "norm test ratio undefined this epoch", values
        required = batch_size * ratio / self.theta**2
        values["required_batch_size"] = required
        threshold = self.theta**2
        if ratio <= threshold:
            return batch_size, (
                f"norm test passed: ratio {ratio:.4g} <= theta^2 = "
                f"{threshold:.4g}"
            ), values
        exponent = math.ceil(math.log2(required / batch_size))
        return batch_size * 2**exponent, (
            f"norm test failed: ratio {ratio:.4g} > theta^2 = "
            f"{threshold:.4g}, so the gradient needs {required:.1f} examples"
        ), values


class NoiseScalePolicy(BatchSizePolicy):
    """Sets the batch size to a multiple of the gradient noise scale.

    B_simple = tr Σ / |G|² (McCandlish et al. 2018) is estimated from the
    epoch averages of `gradient_variance` and `unbiased_gradient_sq_norm`,
    each smoothed over epochs by an exponential moving average before the
    division, because one epoch has few probes and a single |G|² estimate
    can be negative. The target is `multiplier * B_simple`; the batch size
    moves to it by powers of two (`power_of_two_step`).

    Args:
        multiplier: the target batch size in units of B_simple.
        smoothing: weight of the previous average in the moving average, in
            [0, 1); 0 uses the last epoch alone.
        hysteresis: see `power_of_two_step`.
        **bounds: `BatchSizePolicy` arguments.
    """

    name = "noise_scale"
    value_keys = ("noise_scale", "smoothed_noise_scale", "target_batch_size")

    def __init__(self, multiplier=1.0, smoothing=0.5, hysteresis=1.0,
                 **bounds):
        super().__init__(**bounds)
        if not multiplier > 0:
            raise ValueError(
                f"Invalid multiplier: expected a positive number. Received: "
                f"multiplier={multiplier}"
            )
        if not 0 <= smoothing < 1:
            raise ValueError(
                f"Invalid smoothing: expected a number in [0, 1). Received: "
                f"smoothing={smoothing}"
            )
        if not hysteresis >= 0:
            raise ValueError(
                f"Invalid hysteresis: expected a number >= 0. Received: "
                f"hysteresis={hysteresis}"
            )
        self.multiplier = float(multiplier)
        self.smoothing = float(smoothing)
        self.hysteresis = float(hysteresis)
        self._variance = None
        self._signal = None

    def describe(self):
        return dict(
            super().describe(),
            multiplier=self.multiplier,
            smoothing=self.smoothing,
            hysteresis=self.hysteresis,
        )

    def _update_averages(self, variance, signal):
        if not (math.isfinite(variance) and math.isfinite(signal)):
            return
        if self._variance is None:
            self._variance, self._signal = variance, signal
            return
        weight = self.smoothing
        self._variance = weight * self._variance + (1 - weight) * variance
        self._signal = weight * self._signal + (1 - weight) * signal

    def propose(self, epoch, batch_size, logs, samples):
        self._update_averages(
            float(logs.get("gradient_variance", math.nan)),
            float(logs.get("unbiased_gradient_sq_norm", math.nan)),
        )
        values = {"noise_scale": float(logs.get("noise_scale", math.nan))}
        if self._signal is None or not self._signal > 0:
            return batch_size, (
                "noise scale undefined: no positive estimate of |G|^2 yet"
            ), values
        smoothed = self._variance / self._signal
        target = self.multiplier * smoothed
        values.update(smoothed_noise_scale=smoothed, target_batch_size=target)
        proposed = power_of_two_step(batch_size, target, self.hysteresis)
        return proposed, (
            f"smoothed B_simple {smoothed:.4g} gives target batch size "
            f"{target:.1f}"
        ), values


@dataclasses.dataclass(frozen=True)
class TargetTrajectory:
    """Per-epoch target bands for C̄_K and L_K.

    Index e of each array is the band at the end of 0-based epoch e. Build
    one with `from_runs` (beacon runs) or `from_region`.

    Attributes:
        condition_low, condition_high: `[epochs]` band of C̄_K.
        energy_low, energy_high: `[epochs]` band of L_K.
        source: a description, for the run records.
    """

    condition_low: np.ndarray
    condition_high: np.ndarray
    energy_low: np.ndarray
    energy_high: np.ndarray
    source: str

    @property
    def num_epochs(self):
        return len(self.energy_low)

    @classmethod
    def from_runs(cls, run_dirs, num_epochs, tolerance=0.1):
        """Build the band spanned by beacon runs, widened by `tolerance`.

        At each epoch the band runs from the smallest beacon value divided
        by (1 + tolerance) to the largest times (1 + tolerance).

        Args:
            run_dirs: run folders with an `epochs.csv` each, trained for
                `num_epochs` epochs with the learning-rate schedule of the
                adaptive run.
            num_epochs: the epochs of the adaptive run.
            tolerance: relative widening of the band, >= 0.

        Raises:
            ValueError: if no folder is given, a folder has no epochs.csv, or
                a beacon ran for a different number of epochs.
        """
        if not run_dirs:
            raise ValueError(
                "Invalid beacon runs: the list is empty. Pass at least one "
                "run folder with an epochs.csv."
            )
        _check_tolerance(tolerance)
        curves = [_read_beacon(path, num_epochs) for path in run_dirs]
        conditions = np.array([curve[0] for curve in curves])
        energies = np.array([curve[1] for curve in curves])
        widen = 1.0 + tolerance
        return cls(
            condition_low=conditions.min(axis=0) / widen,
            condition_high=conditions.max(axis=0) * widen,
            energy_low=energies.min(axis=0) / widen,
            energy_high=energies.max(axis=0) * widen,
            source="beacons: " + ", ".join(str(path) for path in run_dirs),
        )

    @classmethod
    def from_region(cls, condition_range, energy_range, num_epochs):
        """Build bands that end in a target region of the (C̄_K, L_K) plane.

        C̄_K is a running mean, so its band is `condition_range` at every
        epoch. L_K is a running sum: its band at epoch e is `energy_range`
        times the share of the run's summed learning rate spent by the end
        of epoch e (`tf_fisher.schedules.learning_rate_for_epoch`).

        NOTE: the L_K share assumes that each epoch adds energy in
        proportion to its learning rate, which is true at a fixed batch size
        only while the mean per-example gradient norm stays constant. The
        norm falls as the network fits the data, so a fixed-size run that
        ends inside the region lies above this band in earlier epochs.

        Args:
            condition_range: (low, high) of C̄_K at the end of training.
            energy_range: (low, high) of L_K at the end of training.
            num_epochs: the epochs of the run.

        Raises:
            ValueError: if a range is not two positive increasing numbers.
        """
        condition_low, condition_high = _check_range(
            "condition_range", condition_range
        )
        energy_low, energy_high = _check_range("energy_range", energy_range)
        rates = np.array([
            schedules.learning_rate_for_epoch(epoch, num_epochs, 1.0)
            for epoch in range(num_epochs)
        ])
        share = np.cumsum(rates) / rates.sum()
        ones = np.ones(num_epochs)
        return cls(
            condition_low=condition_low * ones,
            condition_high=condition_high * ones,
            energy_low=energy_low * share,
            energy_high=energy_high * share,
            source=(
                f"region: C_K in [{condition_low:g}, {condition_high:g}], "
                f"L_K in [{energy_low:g}, {energy_high:g}]"
            ),
        )


class MeasureGuidedPolicy(BatchSizePolicy):
    """Keeps (C̄_K, L_K) close to a target trajectory.

    L_K responds to the batch size in a predictable way. A probe's energy
    l = (α / B) sqrt(Tr F), and Tr F is about B times the mean squared
    per-example gradient norm, so l scales as α B^(-1/2) and the energy of
    one epoch (N / B steps) as α B^(-3/2). At the end of each epoch the
    policy predicts L_K after the next epoch (`predict_cumulative_energy`)
    for every size B · 2^k within the bounds, from the mean probe energy of
    the epoch just ended. It takes the size whose predicted L_K is nearest
    the next epoch's band (log distance, 0 inside). C̄_K breaks ties:
    larger batches raise the condition numbers, so when C̄_K is above its
    band a smaller batch is preferred, and when below a larger one. The last
    tie-break is the smallest change. C̄_K only breaks ties because the
    policy has no model of how it responds to the batch size, and early in
    training it is a mean of few probes: for the MLP on the embedded digits
    at batch size 512, C̄_K was about 30 after the first epoch and 2·10^4
    after the fifth.

    The policy reads, besides C̄_K and L_K, the running sums of the measures
    (`energy_sum`, `num_iterations`, `num_samples`), `num_examples`,
    `fisher_interval` and the learning rates from the logs that
    `AdaptiveBatchSize` passes, and the probes' `fisher_energy`.

    Args:
        target: a `TargetTrajectory` with at least as many epochs as the run.
        **bounds: `BatchSizePolicy` arguments.
    """

    name = "measure"
    needs_probes = True
    value_keys = (
        "mean_condition_number",
        "cumulative_fisher_energy",
        "mean_fisher_energy",
        "condition_low",
        "condition_high",
        "energy_low",
        "energy_high",
        "predicted_energy",
    )

    def __init__(self, target, **bounds):
        super().__init__(**bounds)
        self.target = target

    def describe(self):
        return dict(super().describe(), target=self.target.source)

    def propose(self, epoch, batch_size, logs, samples):
        condition = float(logs.get("mean_condition_number", math.nan))
        energy = float(logs.get("cumulative_fisher_energy", math.nan))
        mean_energy = _finite_mean(row.get("fisher_energy") for row in samples)
        values = {
            "mean_condition_number": condition,
            "cumulative_fisher_energy": energy,
            "mean_fisher_energy": mean_energy,
        }
        next_epoch = epoch + 1
        if next_epoch >= self.target.num_epochs:
            return batch_size, "no target beyond the last epoch", values
        if not all(map(math.isfinite, (condition, energy, mean_energy))):
            return batch_size, "C_K, L_K or the probe energy undefined", values
        band = self._band(next_epoch)
        values.update(band)
        scores = {}
        for size in self._candidates(batch_size):
            predicted = _predict_from_logs(logs, mean_energy, batch_size, size)
            scores[size] = (
                _log_distance(
                    predicted, band["energy_low"], band["energy_high"]
                ),
                _condition_penalty(size, batch_size, condition, band),
                abs(math.log2(size / batch_size)),
                predicted,
            )
        best = min(scores, key=lambda size: scores[size][:3])
        values["predicted_energy"] = scores[best][3]
        return best, self._reason(best, batch_size, scores, band), values

    def _band(self, epoch):
        return {
            "condition_low": float(self.target.condition_low[epoch]),
            "condition_high": float(self.target.condition_high[epoch]),
            "energy_low": float(self.target.energy_low[epoch]),
            "energy_high": float(self.target.energy_high[epoch]),
        }

    def _candidates(self, batch_size):
        """Return B · 2^k for every integer k that stays within the bounds,
        and the bounds themselves."""
        sizes = {batch_size, self.min_batch_size, self.max_batch_size}
        size = batch_size
        while size * 2 <= self.max_batch_size:
            size *= 2
            sizes.add(size)
        size = batch_size
        while size // 2 >= self.min_batch_size:
            size //= 2
            sizes.add(size)
        return sorted(sizes)

    @staticmethod
    def _reason(best, batch_size, scores, band):
        text = (
            f"L_K predicted {scores[batch_size][3]:.4g} at batch size "
            f"{batch_size} for a band of [{band['energy_low']:.4g}, "
            f"{band['energy_high']:.4g}]"
        )
        if best != batch_size:
            text += f", {scores[best][3]:.4g} at batch size {best}"
        return text


def predict_cumulative_energy(energy_sum, num_iterations, num_samples,
                              mean_energy, batch_size, new_batch_size,
                              num_examples, fisher_interval,
                              rate_ratio=1.0):
    """Predict L_K after one more epoch at `new_batch_size`.

    The next epoch has S = ceil(num_examples / new_batch_size) steps and
    ceil(S / fisher_interval) probes, each of energy `mean_energy` times
    sqrt(batch_size / new_batch_size) times `rate_ratio`. L_K is then the
    new energy sum times the new iteration count over the new sample count,
    as `tf_fisher.measures.RunningMeasures` computes it.

    Args:
        energy_sum, num_iterations, num_samples: the running sums so far
            (`RunningMeasures.state()`).
        mean_energy: mean l_k of the last epoch's probes.
        batch_size: the batch size of the last epoch.
        new_batch_size: the batch size of the next epoch.
        num_examples: training examples per epoch.
        fisher_interval: steps between probes within an epoch.
        rate_ratio: next epoch's learning rate over the last epoch's.

    Returns:
        The predicted L_K, a float.
    """
    steps = math.ceil(num_examples / new_batch_size)
    probes = math.ceil(steps / fisher_interval)
    energy = mean_energy * rate_ratio * math.sqrt(batch_size / new_batch_size)
    return (
        (energy_sum + probes * energy)
        * (num_iterations + steps)
        / (num_samples + probes)
    )


def _predict_from_logs(logs, mean_energy, batch_size, new_batch_size):
    return predict_cumulative_energy(
        energy_sum=logs["energy_sum"],
        num_iterations=logs["num_iterations"],
        num_samples=logs["num_samples"],
        mean_energy=mean_energy,
        batch_size=batch_size,
        new_batch_size=new_batch_size,
        num_examples=logs["num_examples"],
        fisher_interval=logs["fisher_interval"],
        rate_ratio=_learning_rate_ratio(logs),
    )


def _finite_mean(values):
    finite = [
        float(value) for value in values
        if value is not None and math.isfinite(float(value))
    ]
    return sum(finite) / len(finite) if finite else math.nan


def _learning_rate_ratio(logs):
    current = logs.get("learning_rate")
    following = logs.get("next_learning_rate")
    if current is None or following is None or not current > 0:
        return 1.0
    return float(following) / float(current)


def _log_distance(value, low, high):
    if value <= 0:
        return math.inf
    return max(0.0, math.log(low / value), math.log(value / high))


def _condition_penalty(size, batch_size, condition, band):
    """0 when `size` moves C̄_K towards its band (or C̄_K is inside it),
    1 when it keeps the batch size, 2 when it moves away."""
    if band["condition_low"] <= condition <= band["condition_high"]:
        return 0
    if size == batch_size:
        return 1
    too_high = condition > band["condition_high"]
    return 0 if (size < batch_size) == too_high else 2


def _read_beacon(path, num_epochs):
    """Return (C̄_K per epoch, L_K per epoch) from a run's epochs.csv."""
    csv_path = os.path.join(path, "epochs.csv")
    if not os.path.exists(csv_path):
        raise ValueError(
            f"Invalid beacon run {path!r}: it has no epochs.csv. Pass the "
            "folder of a finished tf_fisher run."
        )
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if len(rows) != num_epochs:
        raise ValueError(
            f"Invalid beacon run {path!r}: it has {len(rows)} epochs, but "
            f"the adaptive run has {num_epochs}. Beacons must train for the "
            "same number of epochs, so that their learning rates drop at "
            "the same epochs."
        )
    conditions = [float(row["mean_condition_number"]) for row in rows]
    energies = [float(row["cumulative_fisher_energy"]) for row in rows]
    return conditions, energies


def _check_range(name, value):
    try:
        low, high = (float(item) for item in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Invalid {name}: expected two numbers (low, high). Received: "
            f"{name}={value!r}"
        ) from None
    if not 0 < low < high:
        raise ValueError(
            f"Invalid {name}: expected 0 < low < high. Received: "
            f"{name}={value!r}"
        )
    return low, high


def _check_tolerance(tolerance):
    if not tolerance >= 0:
        raise ValueError(
            f"Invalid tolerance: expected a number >= 0. Received: "
            f"tolerance={tolerance}"
        )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Invalid {name}: expected a positive integer. Received: "
            f"{name}={value!r}"
        )


def make_policy(name, num_epochs, min_batch_size=16, max_batch_size=512,
                min_epochs_per_size=2, theta=0.9, multiplier=1.0,
                smoothing=0.5, beacon_dirs=(), condition_range=None,
                energy_range=None, tolerance=0.1):
    """Build a policy by name, as the command line does.

    Args:
        name: one of `POLICY_NAMES`.
        num_epochs: the epochs of the run (for the measure policy's target).
        min_batch_size, max_batch_size, min_epochs_per_size: the bounds of
            every policy.
        theta: `NormTestPolicy` θ.
        multiplier, smoothing: `NoiseScalePolicy` arguments.
        beacon_dirs: beacon run folders for the measure policy; or else
        condition_range, energy_range: its target region.
        tolerance: widening of the beacon band.

    Raises:
        ValueError: for an unknown name or invalid parameters.
    """
    bounds = {
        "min_batch_size": min_batch_size,
        "max_batch_size": max_batch_size,
        "min_epochs_per_size": min_epochs_per_size,
    }
    if name == "norm_test":
        return NormTestPolicy(theta=theta, **bounds)
    if name == "noise_scale":
        return NoiseScalePolicy(
            multiplier=multiplier, smoothing=smoothing, **bounds
        )
    if name == "measure":
        return MeasureGuidedPolicy(
            _measure_target(
                num_epochs, beacon_dirs, condition_range, energy_range,
                tolerance,
            ),
            **bounds,
        )
    raise ValueError(
        f"Invalid adaptive policy {name!r}: expected one of "
        f"{', '.join(POLICY_NAMES)}."
    )


def _measure_target(num_epochs, beacon_dirs, condition_range, energy_range,
                    tolerance):
    has_region = condition_range is not None or energy_range is not None
    if beacon_dirs and has_region:
        raise ValueError(
            "The measure policy takes either beacon runs or a target region, "
            f"not both. Received: beacon_dirs={list(beacon_dirs)}, "
            f"condition_range={condition_range}, energy_range={energy_range}"
        )
    if beacon_dirs:
        return TargetTrajectory.from_runs(beacon_dirs, num_epochs, tolerance)
    if condition_range is None or energy_range is None:
        raise ValueError(
            "The measure policy needs a target: beacon run folders "
            "(--beacon_dirs), or both --target_condition_number and "
            "--target_fisher_energy as low,high pairs."
        )
    return TargetTrajectory.from_region(
        condition_range, energy_range, num_epochs
    )
