"""The MNIST grid of Liao et al. 2020 for the MLP, for a GPU.

    python -m experiments.sweep mnist_mlp \\
        --output_dir=runs/mnist_mlp --jobs=1 \\
        --data_dir=~/tensorflow_datasets
    python -m tools.report runs/mnist_mlp

40 epochs, batch sizes 2 ... 1024 x learning rates 0.00625 ... 0.8 (powers
of two) x five seeds, and 11 dynamic-sampling schedules at learning rate 0.1
with their beacons: 455 runs (see `_paper` for the sources). Needs the
TensorFlow Datasets folder of "mnist" (prepared beforehand; nothing is
downloaded): pass --data_dir when it is not the default.

Run time: the authors publish none for the MLP, and it has not been measured
here.
"""

from experiments.configs import _paper
from experiments.study import Study


def get_study():
    grid = _paper.paper_grid(
        dataset="mnist",
        model="mlp",
        epochs=40,
        batch_sizes=_paper.MNIST_MLP_BATCH_SIZES,
        learning_rates=_paper.MNIST_LEARNING_RATES,
        schedules=_paper.MNIST_SCHEDULES,
    )
    return Study(
        name="mnist_mlp",
        description=(
            "MNIST MLP grid of Liao et al. 2020: "
            f"{_paper.num_runs(grid)} runs."
        ),
        grids=(grid,),
    )
