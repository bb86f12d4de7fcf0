"""Layers for the paper's networks."""

from keras_gradreg.layers.fast_dropout import FastDropout, replace_dropout
from keras_gradreg.layers.maxout import Maxout

__all__ = ["FastDropout", "Maxout", "replace_dropout"]
