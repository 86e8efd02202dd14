"""tf_fisher: the Fisher measures of Liao et al. (TPAMI 2020) for Keras.

The public names are the Gram matrix of per-example gradients
(`gram_matrix`), a model wrapper whose training step measures it
(`FisherModel`), the callback that records the measures
(`FisherCallback`), the measures of one Gram matrix
(`spectrum_statistics`) and their running values over a run
(`RunningMeasures`), and a callback that changes the batch size between
epochs (`AdaptiveBatchSize`), with `fit_adaptive`, which rebuilds the
dataset for each new batch size.
"""

from tf_fisher.adaptive import AdaptiveBatchSize
from tf_fisher.adaptive import fit_adaptive
from tf_fisher.callbacks import FisherCallback
from tf_fisher.gram import gram_matrix
from tf_fisher.measures import RunningMeasures
from tf_fisher.measures import spectrum_statistics
from tf_fisher.model import FisherModel

__all__ = [
    "AdaptiveBatchSize",
    "FisherCallback",
    "FisherModel",
    "RunningMeasures",
    "fit_adaptive",
    "gram_matrix",
    "spectrum_statistics",
]
__version__ = "0.1.0"
