"""The SVHN grid of Liao et al. 2020 for ResNet-110, for a GPU.

    python -m experiments.sweep svhn_resnet110 \\
        --output_dir=runs/svhn_resnet110 --jobs=1 \\
        --data_dir=~/tensorflow_datasets
    python -m tools.report runs/svhn_resnet110

40 epochs, batch sizes 8 ... 512 x learning rates 0.025 ... 0.4 (powers of
two) x five seeds, and 9 dynamic-sampling schedules at learning rate 0.1
with their beacons: 220 runs (see `_paper` for the sources). Needs the
TensorFlow Datasets folder of "svhn_cropped" (prepared beforehand; nothing
is downloaded): pass --data_dir when it is not the default. As in the
paper, the runs train on its train and extra splits together (dataset
"svhn_cropped_extra", 604,388 images), which take 7.4 GB of memory.

Run time: the authors report 9.5 h for one run on an NVIDIA Titan X or K40
(their Table 1). At that rate the 220 runs take about 2,100 GPU-hours (87
GPU-days). This code's speed on a GPU has not been measured.
"""

from experiments.configs import _paper
from experiments.study import Study


def get_study():
    grid = _paper.paper_grid(
        dataset="svhn_cropped_extra",
        model="resnet110",
        epochs=40,
        batch_sizes=_paper.RESNET_BATCH_SIZES,
        learning_rates=_paper.CIFAR_LEARNING_RATES,
        schedules=_paper.RESNET_SCHEDULES,
    )
    return Study(
        name="svhn_resnet110",
        description=(
            "SVHN ResNet-110 grid of Liao et al. 2020: "
            f"{_paper.num_runs(grid)} runs."
        ),
        grids=(grid,),
    )
