"""Tests for the learning-rate and batch-size schedules in tf_fisher.schedules."""

import itertools
import math

import pytest

from tf_fisher import schedules
from tf_fisher.schedules import Stage

# Batch sizes of the dynamic-sampling schedules of Liao et al., "Approximate
# Fisher Information Matrix to Characterise the Training of Deep Neural
# Networks", TPAMI 2020, written out by hand.
NAMED_SIZES = {
    "s32-to-512": [32, 64, 128, 256, 512],
    "s512-to-32": [512, 256, 128, 64, 32],
    "s16-to-64": [16, 16, 32, 32, 64],
    "s16-to-256": [16, 32, 64, 128, 256],
    "s32-to-128": [32, 32, 64, 64, 128],
    "s64-to-256": [64, 64, 128, 128, 256],
    "s128-to-512": [128, 128, 256, 256, 512],
    "s256-to-16": [256, 128, 64, 32, 16],
}


def epoch_ranges(stages):
    return [(stage.first_epoch, stage.end_epoch) for stage in stages]


def sizes_of(stages):
    return [stage.batch_size for stage in stages]


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_named_schedule_batch_sizes(name):
    assert schedules.schedule_batch_sizes(name) == NAMED_SIZES[name]


def test_named_schedules_list_matches_table():
    assert sorted(schedules.NAMED_SCHEDULES) == sorted(NAMED_SIZES)


def test_schedule_with_other_first_size():
    assert schedules.schedule_batch_sizes("s3-to-48") == [3, 6, 12, 24, 48]
    assert schedules.schedule_batch_sizes("s20-to-5") == [20, 10, 10, 5, 5]


def test_even_stages_divides_evenly():
    stages = schedules.even_stages([32, 64, 128, 256, 512], 10)
    assert sizes_of(stages) == [32, 64, 128, 256, 512]
    assert epoch_ranges(stages) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_even_stages_remainder_goes_first():
    stages = schedules.even_stages([16, 16, 32, 32, 64], 7)
    assert epoch_ranges(stages) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]
    assert [stage.num_epochs for stage in stages] == [2, 2, 1, 1, 1]


@pytest.mark.parametrize("num_stages", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("num_epochs", [7, 10, 13, 40, 321])
def test_even_stages_lengths(num_stages, num_epochs):
    stages = schedules.even_stages(list(range(1, num_stages + 1)), num_epochs)
    # Closed form: stage i of k over n epochs has (n + k - 1 - i) // k.
    expected = [
        (num_epochs + num_stages - 1 - i) // num_stages
        for i in range(num_stages)
    ]
    assert [stage.num_epochs for stage in stages] == expected
    assert stages[0].first_epoch == 0
    assert stages[-1].end_epoch == num_epochs
    for before, after in itertools.pairwise(stages):
        assert before.end_epoch == after.first_epoch


def test_fixed_batch_is_one_stage():
    assert schedules.fixed_stages(64, 12) == [Stage(64, 0, 12)]
    assert schedules.even_stages([64], 12) == [Stage(64, 0, 12)]


def test_even_stages_more_stages_than_epochs():
    with pytest.raises(ValueError, match=r"5 stages.*epochs=3") as error:
        schedules.even_stages([32, 64, 128, 256, 512], 3)
    assert "[32, 64, 128, 256, 512]" in str(error.value)
    assert "at least 5" in str(error.value)


def test_even_stages_no_stage():
    with pytest.raises(ValueError, match="no stage"):
        schedules.even_stages([], 10)


@pytest.mark.parametrize(
    "num_epochs, first_drop, second_drop",
    [(10, 5, 8), (20, 10, 15), (22, 11, 17), (40, 20, 30), (320, 160, 240)],
)
def test_learning_rate_drops(num_epochs, first_drop, second_drop):
    rates = [
        schedules.learning_rate_for_epoch(epoch, num_epochs, 0.1)
        for epoch in range(num_epochs)
    ]
    expected = (
        [0.1] * first_drop
        + [0.01] * (second_drop - first_drop)
        + [0.001] * (num_epochs - second_drop)
    )
    assert rates == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "num_epochs, periods",
    [
        (10, [(0, 5), (5, 8), (8, 10)]),
        (20, [(0, 10), (10, 15), (15, 20)]),
        (22, [(0, 11), (11, 17), (17, 22)]),
        (1, [(0, 1)]),
        (2, [(0, 1), (1, 2)]),
    ],
)
def test_learning_rate_periods(num_epochs, periods):
    assert schedules.learning_rate_periods(num_epochs) == periods


def test_parse_schedule_plain_uneven():
    stages = schedules.parse_schedule("s32-to-512", 12)
    assert sizes_of(stages) == [32, 64, 128, 256, 512]
    assert epoch_ranges(stages) == [
        (0, 3), (3, 6), (6, 8), (8, 10), (10, 12),
    ]


def test_parse_multi_step_even():
    stages = schedules.parse_schedule("s32-to-512-MS", 20)
    assert sizes_of(stages) == [32, 64, 128, 256, 512] * 3
    lengths = [stage.num_epochs for stage in stages]
    assert lengths == [2] * 5 + [1] * 5 + [1] * 5
    schedules.check_stages(stages, 20)


def test_parse_multi_step_uneven():
    # Learning-rate periods of 22 epochs have 11, 6 and 5 epochs.
    stages = schedules.parse_schedule("s16-to-64-MS", 22)
    assert sizes_of(stages) == [16, 16, 32, 32, 64] * 3
    lengths = [stage.num_epochs for stage in stages]
    assert lengths == [3, 2, 2, 2, 2] + [2, 1, 1, 1, 1] + [1] * 5
    schedules.check_stages(stages, 22)


@pytest.mark.parametrize("num_epochs", [20, 22, 23, 40, 97])
def test_multi_step_stages_keep_one_rate(num_epochs):
    for stage in schedules.parse_schedule("s512-to-32-MS", num_epochs):
        rates = {
            schedules.learning_rate_for_epoch(epoch, num_epochs, 1.0)
            for epoch in range(stage.first_epoch, stage.end_epoch)
        }
        assert len(rates) == 1, stage


def test_multi_step_minimum_epochs():
    with pytest.raises(ValueError, match="Use at least 20 epochs") as error:
        schedules.parse_schedule("s32-to-512-MS", 19)
    assert "'s32-to-512-MS'" in str(error.value)
    assert "epochs=19" in str(error.value)
    assert len(schedules.parse_schedule("s32-to-512-MS", 20)) == 15


def test_plain_schedule_too_few_epochs():
    with pytest.raises(ValueError, match="epochs=4"):
        schedules.parse_schedule("s16-to-256", 4)


@pytest.mark.parametrize(
    "name",
    [
        "s32-512",
        "32-to-512",
        "s32_to_512",
        "s32-to-512-ms",
        "s32-to-512-MS-MS",
        "S32-to-512",
        "s-to-512",
        "sx-to-512",
        "s32-to-",
        "s0-to-16",
        "s16-to-0",
        "s-16-to-256",
        "",
    ],
)
def test_malformed_schedule_name(name):
    with pytest.raises(ValueError, match="Accepted forms") as error:
        schedules.parse_schedule(name, 40)
    assert repr(name) in str(error.value)
    assert "s32-to-512" in str(error.value)


@pytest.mark.parametrize(
    "name", ["s32-to-100", "s32-to-64", "s16-to-16", "s10-to-80", "s5-to-500"]
)
def test_schedule_ratio_not_accepted(name):
    with pytest.raises(ValueError, match="16, 4, 1/4 or 1/16") as error:
        schedules.parse_schedule(name, 40)
    assert repr(name) in str(error.value)


def test_parse_batch_sizes():
    assert schedules.parse_batch_sizes(["16", " 16", "32 ", "64"]) == [
        16, 16, 32, 64,
    ]


@pytest.mark.parametrize("bad", ["0", "-4", "x", "1.5", "", "2e3"])
def test_parse_batch_sizes_rejects(bad):
    with pytest.raises(ValueError, match="positive integers") as error:
        schedules.parse_batch_sizes(["16", bad, "32"])
    assert repr(bad) in str(error.value)


def test_parse_batch_sizes_empty():
    with pytest.raises(ValueError, match="empty"):
        schedules.parse_batch_sizes([])


def test_stages_from_ranges():
    stages = schedules.stages_from_ranges([8, 16], [[0, 3], [3, 5]], 5)
    assert stages == [Stage(8, 0, 3), Stage(16, 3, 5)]


@pytest.mark.parametrize(
    "ranges, num_epochs, message",
    [
        ([[0, 2], [3, 5]], 5, "consecutive"),
        ([[0, 3], [2, 5]], 5, "consecutive"),
        ([[1, 3], [3, 5]], 5, "consecutive"),
        ([[0, 3], [3, 3]], 3, "consecutive"),
        ([[0, 2], [2, 4]], 5, "ends at epoch 4"),
    ],
)
def test_stages_from_ranges_rejects(ranges, num_epochs, message):
    with pytest.raises(ValueError, match=message):
        schedules.stages_from_ranges([8, 16], ranges, num_epochs)


def test_stages_from_ranges_length_mismatch():
    with pytest.raises(ValueError, match="3 batch sizes"):
        schedules.stages_from_ranges([8, 16, 32], [[0, 2], [2, 4]], 4)


def test_stage_index():
    stages = schedules.even_stages([4, 8, 16], 7)
    indices = [schedules.stage_index(stages, epoch) for epoch in range(7)]
    assert indices == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="Epoch 7"):
        schedules.stage_index(stages, 7)


def test_stage_num_epochs():
    assert Stage(32, 4, 9).num_epochs == 5
    assert math.isclose(
        schedules.learning_rate_for_epoch(0, 1, 0.05), 0.05, rel_tol=1e-15
    )
