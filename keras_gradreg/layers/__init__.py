"""Layers for the paper's networks."""

from keras_gradreg.layers.maxout import Maxout

__all__ = ["Maxout"]
