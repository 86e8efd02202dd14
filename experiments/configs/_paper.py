"""The grids of Liao et al. 2020, shared by the per-dataset configurations.

Z. Liao, T. Drummond, I. Reid and G. Carneiro, "Approximate Fisher
Information Matrix to Characterise the Training of Deep Neural Networks",
IEEE TPAMI 42(1), 2020, Section 4 and the supplementary tables:

* CIFAR-10, CIFAR-100 (320 epochs) and SVHN (40 epochs): batch sizes
  8 ... 512 for ResNet-110 and 8 ... 256 for DenseNet-110, learning rates
  0.025 ... 0.4 (powers of two).
* MNIST (40 epochs): batch sizes 2 ... 2048 (2 ... 1024 for the MLP),
  learning rates 0.00625 ... 0.8.
* Every configuration is trained five times from independent random
  initialisations.
* Dynamic sampling at learning rate 0.1, with the fixed-batch runs at 0.1
  as beacons. The schedules differ per model and dataset, and are listed
  below as the supplementary tables give them.

The authors report one run's training time in their Table 1 (NVIDIA Titan X
and K40 GPUs, their Torch code): ResNet-110 7.7 h on CIFAR-10, 7.9 h on
CIFAR-100 and 9.5 h on SVHN; DenseNet-110 16.1 h on CIFAR-10 and CIFAR-100
and 21.9 h on SVHN; ResNet-8 0.14 h and DenseNet-8 0.26 h on MNIST. The
configuration files use these to estimate GPU-hours; the speed of this
code on a GPU has not been measured.
"""

from experiments.study import Grid

SEEDS = (0, 1, 2, 3, 4)
CIFAR_LEARNING_RATES = (0.025, 0.05, 0.1, 0.2, 0.4)
RESNET_BATCH_SIZES = (8, 16, 32, 64, 128, 256, 512)
DENSENET_BATCH_SIZES = (8, 16, 32, 64, 128, 256)
MNIST_LEARNING_RATES = (0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
MNIST_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MNIST_MLP_BATCH_SIZES = MNIST_BATCH_SIZES[:-1]
SCHEDULE_LEARNING_RATE = 0.1

RESNET_SCHEDULES = (
    "s16-to-256",
    "s32-to-128",
    "s32-to-512",
    "s128-to-512",
    "s512-to-32",
    "s16-to-256-MS",
    "s32-to-128-MS",
    "s32-to-512-MS",
    "s128-to-512-MS",
)
DENSENET_SCHEDULES = (
    "s16-to-256",
    "s32-to-128",
    "s64-to-256",
    "s256-to-16",
    "s16-to-256-MS",
    "s32-to-128-MS",
    "s64-to-256-MS",
)
MNIST_SCHEDULES = (
    "s16-to-64",
    "s16-to-256",
    "s32-to-128",
    "s32-to-512",
    "s128-to-512",
    "s512-to-32",
    "s16-to-64-MS",
    "s16-to-256-MS",
    "s32-to-128-MS",
    "s32-to-512-MS",
    "s128-to-512-MS",
)


def paper_grid(dataset, model, epochs, batch_sizes, learning_rates,
               schedules, data_dir=None):
    """Return the grid of one model on one dataset, with five seeds."""
    options = {"data_dir": data_dir} if data_dir else {}
    return Grid(
        dataset=dataset,
        model=model,
        epochs=epochs,
        batch_sizes=batch_sizes,
        learning_rates=learning_rates,
        seeds=SEEDS,
        schedules=schedules,
        schedule_learning_rate=SCHEDULE_LEARNING_RATE,
        options=options,
    )


def num_runs(grid):
    """Return the number of runs of a grid (fixed, beacons and schedules)."""
    fixed = {
        (size, rate)
        for size in grid.batch_sizes
        for rate in grid.learning_rates
    }
    if grid.schedules:
        fixed.update(
            (size, grid.schedule_learning_rate)
            for size in grid.beacon_batch_sizes or grid.batch_sizes
        )
    return (len(fixed) + len(grid.schedules)) * len(grid.seeds)
