"""The CIFAR-10 grid of Liao et al. 2020 for DenseNet-110, for a GPU.

    python -m experiments.sweep cifar10_densenet110 \\
        --output_dir=runs/cifar10_densenet110 --jobs=1 \\
        --data_dir=~/tensorflow_datasets
    python -m tools.report runs/cifar10_densenet110

320 epochs, batch sizes 8 ... 256 x learning rates 0.025 ... 0.4 (powers of
two) x five seeds, and 7 dynamic-sampling schedules at learning rate 0.1
with their beacons: 185 runs (see `_paper` for the sources). Needs the
TensorFlow Datasets folder of "cifar10" (prepared beforehand; nothing is
downloaded): pass --data_dir when it is not the default.

Run time: the authors report 16.1 h for one run on an NVIDIA Titan X or K40
(their Table 1). At that rate the 185 runs take about 3,000 GPU-hours (124
GPU-days). This code's speed on a GPU has not been measured.
"""

from experiments.configs import _paper
from experiments.study import Study


def get_study():
    grid = _paper.paper_grid(
        dataset="cifar10",
        model="densenet110",
        epochs=320,
        batch_sizes=_paper.DENSENET_BATCH_SIZES,
        learning_rates=_paper.CIFAR_LEARNING_RATES,
        schedules=_paper.DENSENET_SCHEDULES,
    )
    return Study(
        name="cifar10_densenet110",
        description=(
            "CIFAR-10 DenseNet-110 grid of Liao et al. 2020: "
            f"{_paper.num_runs(grid)} runs."
        ),
        grids=(grid,),
    )
