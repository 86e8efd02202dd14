"""The MNIST grid of Liao et al. 2020 for DenseNet-8, for a GPU.

    python -m experiments.sweep mnist_densenet8 \\
        --output_dir=runs/mnist_densenet8 --jobs=1 \\
        --data_dir=~/tensorflow_datasets
    python -m tools.report runs/mnist_densenet8

40 epochs, batch sizes 2 ... 2048 x learning rates 0.00625 ... 0.8 (powers
of two) x five seeds, and 11 dynamic-sampling schedules at learning rate 0.1
with their beacons: 495 runs (see `_paper` for the sources). Needs the
TensorFlow Datasets folder of "mnist" (prepared beforehand; nothing is
downloaded): pass --data_dir when it is not the default.

Run time: the authors report 0.26 h for one run on an NVIDIA Titan X or K40
(their Table 1). At that rate the 495 runs take about 130 GPU-hours. This
code's speed on a GPU has not been measured.
"""

from experiments.configs import _paper
from experiments.study import Study


def get_study():
    grid = _paper.paper_grid(
        dataset="mnist",
        model="densenet8",
        epochs=40,
        batch_sizes=_paper.MNIST_BATCH_SIZES,
        learning_rates=_paper.MNIST_LEARNING_RATES,
        schedules=_paper.MNIST_SCHEDULES,
    )
    return Study(
        name="mnist_densenet8",
        description=(
            "MNIST DenseNet-8 grid of Liao et al. 2020: "
            f"{_paper.num_runs(grid)} runs."
        ),
        grids=(grid,),
    )
