"""The CIFAR-100 grid of Liao et al. 2020 for ResNet-110, for a GPU.

    python -m experiments.sweep cifar100_resnet110 \\
        --output_dir=runs/cifar100_resnet110 --jobs=1 \\
        --data_dir=~/tensorflow_datasets
    python -m tools.report runs/cifar100_resnet110

320 epochs, batch sizes 8 ... 512 x learning rates 0.025 ... 0.4 (powers of
two) x five seeds, and 9 dynamic-sampling schedules at learning rate 0.1
with their beacons: 220 runs (see `_paper` for the sources). Needs the
TensorFlow Datasets folder of "cifar100" (prepared beforehand; nothing is
downloaded): pass --data_dir when it is not the default.

Run time: the authors report 7.9 h for one run on an NVIDIA Titan X or K40
(their Table 1). At that rate the 220 runs take about 1,700 GPU-hours (72
GPU-days). This code's speed on a GPU has not been measured.
"""

from experiments.configs import _paper
from experiments.study import Study


def get_study():
    grid = _paper.paper_grid(
        dataset="cifar100",
        model="resnet110",
        epochs=320,
        batch_sizes=_paper.RESNET_BATCH_SIZES,
        learning_rates=_paper.CIFAR_LEARNING_RATES,
        schedules=_paper.RESNET_SCHEDULES,
    )
    return Study(
        name="cifar100_resnet110",
        description=(
            "CIFAR-100 ResNet-110 grid of Liao et al. 2020: "
            f"{_paper.num_runs(grid)} runs."
        ),
        grids=(grid,),
    )
