"""Deprecated alias of the internal module `keras_gradreg._randomness` (removed in 0.3.0)."""

from keras_gradreg import _deprecated

_deprecated.moved_module(__name__, "keras_gradreg._randomness")
