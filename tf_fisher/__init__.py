"""tf_fisher: the Fisher measures of Liao et al. (TPAMI 2020) for Keras.

The public names are the Gram matrix of per-example gradients
(`gram_matrix`), a model wrapper whose training step measures it
(`FisherModel`), and the callback that records the measures
(`FisherCallback`).
"""

import importlib

# The module of each public name. A name is imported on first use, so that
# modules without TensorFlow, such as `tf_fisher.cli`, import quickly.
_PUBLIC_MODULES = {
    "AdaptiveBatchSize": "tf_fisher.adaptive",
    "FisherCallback": "tf_fisher.callbacks",
    "FisherModel": "tf_fisher.model",
    "RunningMeasures": "tf_fisher.measures",
    "gram_matrix": "tf_fisher.gram",
    "spectrum_statistics": "tf_fisher.measures",
}

__all__ = [
    "AdaptiveBatchSize",
    "FisherCallback",
    "FisherModel",
    "RunningMeasures",
    "gram_matrix",
    "spectrum_statistics",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _PUBLIC_MODULES:
        raise AttributeError(f"module 'tf_fisher' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC_MODULES[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
