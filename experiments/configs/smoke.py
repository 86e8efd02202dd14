"""A four-run check of the sweep machinery, in which two runs diverge.

    python -m experiments.sweep smoke --output_dir=/tmp/smoke --jobs=2

Trains the MLP on the embedded 5,000-digit MNIST sample for one epoch at
batch sizes 128 and 512 and learning rates 0.05 and 1e6; the rate 1e6
makes the loss overflow, so those runs end as "diverged". Measured: 27 to
63 s wall with --jobs=2 on 2 CPU cores shared with other work, most of it
TensorFlow start-up.
"""

from experiments.study import Grid
from experiments.study import Study


def get_study():
    return Study(
        name="smoke",
        description="Four one-epoch MLP runs on mnist5k; two diverge.",
        grids=(
            Grid(
                dataset="mnist5k",
                model="mlp",
                epochs=1,
                batch_sizes=(128, 512),
                learning_rates=(0.05, 1e6),
                seeds=(0,),
            ),
        ),
    )
