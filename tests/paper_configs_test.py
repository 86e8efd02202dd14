"""Tests that the paper's study configurations expand to the runs of Liao et
al., "Approximate Fisher Information Matrix to Characterise the Training of
Deep Neural Networks", TPAMI 2020.

The expected values are written out by hand from the paper. Section 4 gives
the epochs, the learning-rate drops and the five runs per configuration. The
tables of the supplementary material give the batch sizes, learning rates
and dynamic-sampling schedules of each model and dataset.
"""

import pytest

from experiments import study as study_lib

CIFAR_RATES = [0.025, 0.05, 0.1, 0.2, 0.4]
MNIST_RATES = [0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
RESNET_SIZES = [8, 16, 32, 64, 128, 256, 512]
# DenseNet-110 leaves out 512, which did not fit on one GPU.
DENSENET_SIZES = [8, 16, 32, 64, 128, 256]
MNIST_SIZES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
MLP_SIZES = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
RESNET_SCHEDULES = [
    "s16-to-256", "s32-to-128", "s32-to-512", "s128-to-512", "s512-to-32",
    "s16-to-256-MS", "s32-to-128-MS", "s32-to-512-MS", "s128-to-512-MS",
]
DENSENET_SCHEDULES = [
    "s16-to-256", "s32-to-128", "s64-to-256", "s256-to-16",
    "s16-to-256-MS", "s32-to-128-MS", "s64-to-256-MS",
]
MNIST_SCHEDULES = [
    "s16-to-64", "s16-to-256", "s32-to-128", "s32-to-512", "s128-to-512",
    "s512-to-32", "s16-to-64-MS", "s16-to-256-MS", "s32-to-128-MS",
    "s32-to-512-MS", "s128-to-512-MS",
]

# config: (dataset, model, epochs, batch sizes, rates, schedules)
PAPER_STUDIES = {
    "cifar10_resnet110": (
        "cifar10", "resnet110", 320, RESNET_SIZES, CIFAR_RATES,
        RESNET_SCHEDULES,
    ),
    "cifar100_resnet110": (
        "cifar100", "resnet110", 320, RESNET_SIZES, CIFAR_RATES,
        RESNET_SCHEDULES,
    ),
    "svhn_resnet110": (
        "svhn_cropped_extra", "resnet110", 40, RESNET_SIZES, CIFAR_RATES,
        RESNET_SCHEDULES,
    ),
    "cifar10_densenet110": (
        "cifar10", "densenet110", 320, DENSENET_SIZES, CIFAR_RATES,
        DENSENET_SCHEDULES,
    ),
    "cifar100_densenet110": (
        "cifar100", "densenet110", 320, DENSENET_SIZES, CIFAR_RATES,
        DENSENET_SCHEDULES,
    ),
    "svhn_densenet110": (
        "svhn_cropped_extra", "densenet110", 40, DENSENET_SIZES,
        CIFAR_RATES, DENSENET_SCHEDULES,
    ),
    "mnist_resnet8": (
        "mnist", "resnet8", 40, MNIST_SIZES, MNIST_RATES, MNIST_SCHEDULES,
    ),
    "mnist_densenet8": (
        "mnist", "densenet8", 40, MNIST_SIZES, MNIST_RATES, MNIST_SCHEDULES,
    ),
    "mnist_mlp": (
        "mnist", "mlp", 40, MLP_SIZES, MNIST_RATES, MNIST_SCHEDULES,
    ),
}


def stage_sizes_and_lengths(config):
    """Return the batch size and the number of epochs of each stage."""
    return [
        (stage.batch_size, stage.end_epoch - stage.first_epoch)
        for stage in config.stages()
    ]


@pytest.mark.parametrize("name", sorted(PAPER_STUDIES))
def test_paper_study_runs(name):
    dataset, model, epochs, sizes, rates, schedule_names = PAPER_STUDIES[name]
    specs = study_lib.expand(study_lib.load_study(name), "out")
    configs = [spec.config for spec in specs]

    assert {(c.dataset, c.model, c.epochs) for c in configs} == {
        (dataset, model, epochs)
    }
    recipes = {
        (c.momentum, c.weight_decay, c.fisher_interval) for c in configs
    }
    assert recipes == {(0.9, 1e-4, 50)}

    fixed = [c for c in configs if c.stage_epochs is None]
    dynamic = [c for c in configs if c.stage_epochs is not None]
    # Every batch size runs with every rate and five seeds. The beacons at
    # 0.1 are part of that grid.
    expected_fixed = {
        (size, rate, seed)
        for size in sizes
        for rate in rates
        for seed in range(5)
    }
    assert len(fixed) == len(expected_fixed)
    assert {
        (c.batch_sizes[0], c.learning_rate, c.seed) for c in fixed
    } == expected_fixed
    assert {16, 32, 64, 128, 256} <= {
        c.batch_sizes[0] for c in fixed if c.learning_rate == 0.1
    }

    assert len(dynamic) == 5 * len(schedule_names)
    assert {(c.schedule, c.seed) for c in dynamic} == {
        (schedule, seed) for schedule in schedule_names for seed in range(5)
    }
    assert {c.learning_rate for c in dynamic} == {0.1}


@pytest.mark.parametrize(
    "name, schedule, expected",
    [
        (
            "cifar10_resnet110", "s32-to-512",
            [(32, 64), (64, 64), (128, 64), (256, 64), (512, 64)],
        ),
        (
            "cifar10_densenet110", "s256-to-16",
            [(256, 64), (128, 64), (64, 64), (32, 64), (16, 64)],
        ),
        (
            "cifar100_resnet110", "s32-to-128-MS",
            [(32, 32), (32, 32), (64, 32), (64, 32), (128, 32)]
            + [(32, 16), (32, 16), (64, 16), (64, 16), (128, 16)] * 2,
        ),
        (
            "mnist_resnet8", "s16-to-64",
            [(16, 8), (16, 8), (32, 8), (32, 8), (64, 8)],
        ),
        (
            "svhn_densenet110", "s64-to-256-MS",
            [(64, 4), (64, 4), (128, 4), (128, 4), (256, 4)]
            + [(64, 2), (64, 2), (128, 2), (128, 2), (256, 2)] * 2,
        ),
    ],
)
def test_paper_schedule_stages(name, schedule, expected):
    # Five stages of equal epochs span the run. An -MS schedule has five in
    # each learning-rate period: epochs 1-160, 161-240 and 241-320 of 320,
    # or 1-20, 21-30 and 31-40 of 40.
    specs = study_lib.expand(study_lib.load_study(name), "out")
    configs = [
        spec.config for spec in specs
        if spec.config.schedule == schedule and spec.config.seed == 0
    ]
    assert len(configs) == 1
    assert stage_sizes_and_lengths(configs[0]) == expected
