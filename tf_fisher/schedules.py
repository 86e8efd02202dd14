"""Learning-rate and batch-size schedules of the training recipe.

The learning rate is multiplied by 0.1 at 50% and again at 75% of the epochs
(He et al. 2016, as used by Liao et al. 2020): with 40 epochs the drops come
at epochs 21 and 31, with 320 at 161 and 241 (1-based). It follows the epoch
count only, whatever batch-size stage the epoch belongs to.

A batch-size schedule is a list of `Stage`s: consecutive ranges of epochs, each
trained with one batch size. A fixed batch size is the one-stage case. The
dynamic-sampling schedules of Liao et al., "Approximate Fisher Information
Matrix to Characterise the Training of Deep Neural Networks" (TPAMI 2020),
are named `s{first}-to-{last}`: five stages of equal epochs whose batch sizes
go from `first` to `last` (`parse_schedule`). When the epochs do not divide
evenly, the first stages get one epoch more (`even_stages`).

NOTE: L_K extrapolates the sampled energies with one sampling ratio for the
whole run, as the authors' code does (`tf_fisher.measures.RunningMeasures`).
Larger batches mean fewer steps per epoch, so more of the steps are probed,
and in a run whose batch size grows, L_K can fall from one epoch to the next.
"""

import dataclasses
import math

import keras

# Fractions of the epochs after which the learning rate drops, and the factor.
DROP_FRACTIONS = (0.5, 0.75)
DROP_FACTOR = 0.1


def learning_rate_for_epoch(epoch, num_epochs, base_learning_rate):
    """Return the learning rate of 0-based `epoch` out of `num_epochs`.

    The rate is `base * 0.1**d`, with d the number of drop points
    (0.5 and 0.75 of `num_epochs`) that `epoch` has reached.
    """
    drops = sum(epoch >= fraction * num_epochs for fraction in DROP_FRACTIONS)
    return base_learning_rate * DROP_FACTOR**drops


class StepDecay(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at the start of each epoch.

    When the rate changes and the optimizer is Keras' `SGD` with momentum,
    its momentum buffers are multiplied by new rate / old rate. Keras' SGD
    keeps the velocity scaled by the rate (m = μ m - α g), while Torch's
    `optim.sgd`, which the authors of Liao et al. (2020) trained with,
    keeps it unscaled (v = μ v + g, step α (g + μ v) with Nesterov). Both
    give the same steps while the rate is constant. The rescaling keeps
    them equal across a drop too. Without it, Keras goes on applying the
    velocity at the old rate, which moves the weights by an extra
    μ / (1 - μ) · (α_old - α_new) · v, with v Torch's velocity: about 8
    steps at the old rate for μ = 0.9 and a drop by 10.

    Args:
        base_learning_rate: rate of the first period.
        num_epochs: the total number of epochs of the run, including epochs
            trained by other `fit` calls of the same run.
    """

    def __init__(self, base_learning_rate, num_epochs):
        super().__init__()
        self.base_learning_rate = base_learning_rate
        self.num_epochs = num_epochs

    def on_epoch_begin(self, epoch, logs=None):
        rate = learning_rate_for_epoch(
            epoch, self.num_epochs, self.base_learning_rate
        )
        optimizer = self.model.optimizer
        current = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        if current > 0 and not math.isclose(rate, current, rel_tol=1e-6):
            _scale_sgd_velocities(optimizer, rate / current)
        optimizer.learning_rate.assign(rate)


def _scale_sgd_velocities(optimizer, factor):
    """Multiply the momentum buffers of a built Keras `SGD` by `factor`.

    Other optimizers, and an `SGD` that has not taken a step yet, are left
    unchanged.
    """
    if not isinstance(optimizer, keras.optimizers.SGD) or not optimizer.built:
        return
    for velocity in optimizer.momentums:
        velocity.assign(velocity * factor)


class StageLogs(keras.callbacks.Callback):
    """Adds the batch size and the 0-based stage index of each epoch to the
    epoch logs.

    Place it before `keras.callbacks.TensorBoard`, which then writes them as
    the `epoch_batch_size` and `epoch_stage` scalars, next to the
    `epoch_learning_rate` it writes itself.

    Args:
        stages: the run's `Stage`s, covering every epoch that is trained.
    """

    def __init__(self, stages):
        super().__init__()
        self.stages = list(stages)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        index = stage_index(self.stages, epoch)
        logs["batch_size"] = self.stages[index].batch_size
        logs["stage"] = index


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs `[first_epoch, end_epoch)` (0-based) trained with one batch size."""

    batch_size: int
    first_epoch: int
    end_epoch: int

    @property
    def num_epochs(self):
        return self.end_epoch - self.first_epoch


def stage_index(stages, epoch):
    """Return the index of the stage that contains 0-based `epoch`.

    Raises:
        ValueError: if no stage contains `epoch`.
    """
    for index, stage in enumerate(stages):
        if stage.first_epoch <= epoch < stage.end_epoch:
            return index
    raise ValueError(
        f"Epoch {epoch} (0-based) is in no stage of the schedule "
        f"{_describe(stages)}."
    )


def check_stages(stages, num_epochs):
    """Raise ValueError unless `stages` cover epochs 0 to `num_epochs` - 1
    in order, without gaps, overlaps or empty stages."""
    expected_first = 0
    for stage in stages:
        if (
            stage.first_epoch != expected_first
            or stage.end_epoch <= stage.first_epoch
        ):
            raise ValueError(
                f"Invalid stage epochs {_describe(stages)}: stages must be "
                "consecutive non-empty ranges [first, end) starting at "
                f"epoch 0 and ending at epochs={num_epochs}."
            )
        expected_first = stage.end_epoch
    if expected_first != num_epochs:
        raise ValueError(
            f"Invalid stage epochs {_describe(stages)}: the last stage ends "
            f"at epoch {expected_first}, but the run has epochs="
            f"{num_epochs}."
        )


def stages_from_ranges(batch_sizes, ranges, num_epochs):
    """Return the stages of explicit epoch ranges, one per batch size.

    Args:
        batch_sizes: the batch size of each stage.
        ranges: `[[first, end], ...]`, 0-based epoch ranges, end exclusive.
        num_epochs: the run's number of epochs, which the ranges must cover.

    Raises:
        ValueError: if the lengths differ or the ranges do not cover the
            epochs (see `check_stages`).
    """
    if len(batch_sizes) != len(ranges):
        raise ValueError(
            f"Invalid schedule: {len(batch_sizes)} batch sizes "
            f"({list(batch_sizes)}) but {len(ranges)} stage epoch ranges "
            f"({list(ranges)}). Give one range per batch size."
        )
    stages = [
        Stage(size, int(first), int(end))
        for size, (first, end) in zip(batch_sizes, ranges)
    ]
    check_stages(stages, num_epochs)
    return stages


def _describe(stages):
    return ", ".join(
        f"{stage.batch_size} for epochs [{stage.first_epoch}, "
        f"{stage.end_epoch})"
        for stage in stages
    ) or "(no stage)"


def fixed_stages(batch_size, num_epochs):
    """Return the one-stage schedule of a fixed batch size."""
    return [Stage(batch_size, 0, num_epochs)]


def even_stages(batch_sizes, num_epochs):
    """Split `num_epochs` into one stage per batch size, as evenly as possible.

    When the epochs do not divide evenly, the first `num_epochs % len(sizes)`
    stages get one epoch more than the others.

    Raises:
        ValueError: if there are more stages than epochs, or none.
    """
    num_stages = len(batch_sizes)
    if num_stages == 0:
        raise ValueError("Invalid batch-size schedule: it has no stage.")
    if num_stages > num_epochs:
        raise ValueError(
            f"Invalid batch-size schedule: {num_stages} stages "
            f"({list(batch_sizes)}) need at least {num_stages} epochs, one "
            f"per stage. Received: epochs={num_epochs}. Raise the epochs to "
            f"at least {num_stages} or give fewer batch sizes."
        )
    base, remainder = divmod(num_epochs, num_stages)
    stages = []
    first = 0
    for index, size in enumerate(batch_sizes):
        length = base + (1 if index < remainder else 0)
        stages.append(Stage(size, first, first + length))
        first += length
    return stages


# The dynamic-sampling schedules of Liao et al. 2020: five stages of equal
# epochs. A size ratio of 16 doubles the size at every stage; a ratio of 4
# doubles it every second stage (16, 16, 32, 32, 64).
NAMED_SCHEDULES = (
    "s32-to-512",
    "s512-to-32",
    "s16-to-64",
    "s16-to-256",
    "s32-to-128",
    "s64-to-256",
    "s128-to-512",
    "s256-to-16",
)
_SCHEDULE_FORMS = (
    "s{first}-to-{last} or s{first}-to-{last}-MS, where last/first is 16, "
    "4, 1/4 or 1/16 and both are positive integers (for example "
    f"{', '.join(NAMED_SCHEDULES)}); or an explicit list with "
    "--batch_sizes=16,16,32,32,64"
)


def schedule_batch_sizes(name):
    """Return the five batch sizes of a schedule named `s{a}-to-{b}` or
    `s{a}-to-{b}-MS`.

    Raises:
        ValueError: if the name is malformed or the ratio is not 16, 4, 1/4
            or 1/16.
    """
    base_name = name.removesuffix("-MS")
    first, last = _parse_schedule_name(base_name, name)
    ratio = max(first, last) // min(first, last)
    small = min(first, last)
    if max(first, last) % small or ratio not in (4, 16):
        raise ValueError(
            f"Invalid schedule {name!r}: the ratio of the last to the first "
            f"batch size must be 16, 4, 1/4 or 1/16. Accepted forms: "
            f"{_SCHEDULE_FORMS}."
        )
    if ratio == 16:
        sizes = [small * 2**i for i in range(5)]
    else:
        sizes = [small, small, 2 * small, 2 * small, 4 * small]
    return sizes if first < last else sizes[::-1]


def _parse_schedule_name(base_name, name):
    parts = base_name.split("-")
    if (
        len(parts) != 3
        or parts[1] != "to"
        or not parts[0].startswith("s")
        or not parts[0][1:].isdigit()
        or not parts[2].isdigit()
        or int(parts[0][1:]) < 1
        or int(parts[2]) < 1
    ):
        raise ValueError(
            f"Invalid schedule {name!r}. Accepted forms: {_SCHEDULE_FORMS}."
        )
    return int(parts[0][1:]), int(parts[2])


def learning_rate_periods(num_epochs):
    """Return the epoch ranges `[(first, end), ...]` of constant learning
    rate (0-based, end exclusive), as `learning_rate_for_epoch` sets it."""
    periods = []
    first = 0
    for epoch in range(1, num_epochs + 1):
        if epoch == num_epochs or learning_rate_for_epoch(
            epoch, num_epochs, 1.0
        ) != learning_rate_for_epoch(first, num_epochs, 1.0):
            periods.append((first, epoch))
            first = epoch
    return periods


def parse_schedule(name, num_epochs):
    """Return the stages of a named schedule over `num_epochs` epochs.

    `s{a}-to-{b}` splits all epochs into five stages (see `even_stages`).
    `s{a}-to-{b}-MS` (multi-step) runs the five sizes again inside each
    learning-rate period (0-50%, 50-75%, 75-100% of the epochs), each period
    split by `even_stages`.

    Raises:
        ValueError: for a malformed name, or too few epochs for the stages.
    """
    sizes = schedule_batch_sizes(name)
    if not name.endswith("-MS"):
        return even_stages(sizes, num_epochs)
    stages = []
    for first, end in learning_rate_periods(num_epochs):
        if end - first < len(sizes):
            raise ValueError(
                f"Invalid schedule {name!r} for epochs={num_epochs}: the "
                f"learning-rate period of epochs {first + 1}-{end} has "
                f"{end - first} epochs, fewer than the {len(sizes)} stages. "
                f"Use at least {_min_multi_step_epochs(len(sizes))} epochs."
            )
        for stage in even_stages(sizes, end - first):
            stages.append(
                Stage(
                    stage.batch_size,
                    first + stage.first_epoch,
                    first + stage.end_epoch,
                )
            )
    return stages


def _min_multi_step_epochs(num_sizes):
    epochs = num_sizes
    while min(end - first for first, end in learning_rate_periods(epochs)) < (
        num_sizes
    ) or len(learning_rate_periods(epochs)) < 3:
        epochs += 1
    return epochs


def parse_batch_sizes(values):
    """Parse a list of strings such as ["16", "32"] into positive integers.

    Raises:
        ValueError: naming the first entry that is not a positive integer.
    """
    sizes = []
    for value in values:
        text = str(value).strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(
                f"Invalid batch size {value!r} in --batch_sizes: expected "
                "positive integers separated by commas, such as 16,16,32."
            )
        sizes.append(int(text))
    if not sizes:
        raise ValueError("Invalid --batch_sizes: the list is empty.")
    return sizes
