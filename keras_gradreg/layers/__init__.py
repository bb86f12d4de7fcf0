"""Layers for the paper's networks."""

from keras_gradreg.layers.ceil_max_pooling import CeilMaxPooling2D
from keras_gradreg.layers.fast_dropout import FastDropout, replace_dropout
from keras_gradreg.layers.maxout import Maxout
from keras_gradreg.layers.whitening import (
    ContrastNormalizeZCA,
    fit_zca,
    global_contrast_normalize,
)

__all__ = [
    "CeilMaxPooling2D",
    "ContrastNormalizeZCA",
    "FastDropout",
    "Maxout",
    "fit_zca",
    "global_contrast_normalize",
    "replace_dropout",
]
