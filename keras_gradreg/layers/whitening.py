"""Global contrast normalisation and ZCA whitening, as a layer fitted by `adapt`.

The maxout paper trained on CIFAR-10 preprocessed by pylearn2's
`Pipeline([GlobalContrastNormalization(scale=55.), ZCA()])` (ZCA's default
filter_bias 1), fitted on the training set. Here the same transform is the
first layer of the model, with its statistics fitted on the training split and
stored as non-trainable weights, so the model takes [0, 1] pixels: its input
gradient, the regulariser's sigma and the attacks' epsilons (and clipping to
[0, 1]) are all in pixel space, and a saved `.keras` model carries its
preprocessing.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

MIN_DIVISOR = 1e-8


def global_contrast_normalize(x: np.ndarray, scale: float = 55.0) -> np.ndarray:
    """pylearn2's GCN: each example minus its mean, scaled to L2 norm `scale`.

    Args:
        x: Examples, shape (N, ...), any numeric type.
        scale: The L2 norm of each normalised example.

    Returns:
        float64 array of shape (N, D), D the product of the example axes.
    """
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.sqrt((flat**2).sum(axis=1, keepdims=True)) / scale
    norms[norms < MIN_DIVISOR] = 1.0
    return flat / norms


def fit_zca(x: np.ndarray, filter_bias: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ZCA whitening matrix of rows `x` (pylearn2's `ZCA`).

    W = U diag(1 / sqrt(s + filter_bias)) U^T with U, s the eigenvectors and
    eigenvalues of the covariance of `x`, so (x - mean) @ W has covariance
    U diag(s / (s + filter_bias)) U^T.

    Args:
        x: (N, D) rows, e.g. the output of `global_contrast_normalize`.
        filter_bias: Added to the eigenvalues; > 0.

    Returns:
        (mean (D,), W (D, D)), float32.
    """
    if not filter_bias > 0:
        raise ValueError(f"`filter_bias` must be > 0. Received: filter_bias={filter_bias!r}")
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    count, size = centred.shape
    if count >= size:
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / count)
        eigenvalues = np.maximum(eigenvalues, 0.0)
        whitening = (eigenvectors / np.sqrt(eigenvalues + filter_bias)) @ eigenvectors.T
    else:
        # Fewer examples than dimensions: the covariance has rank < count, so
        # take its eigenvectors from a thin SVD (cost N^2 D, not D^3); the
        # null space has eigenvalue 0, i.e. scale 1 / sqrt(filter_bias).
        _, singular_values, rows = np.linalg.svd(centred / np.sqrt(count), full_matrices=False)
        eigenvalues = singular_values**2
        scaled = rows.T * (1.0 / np.sqrt(eigenvalues + filter_bias) - 1.0 / np.sqrt(filter_bias))
        whitening = scaled @ rows + np.eye(size) / np.sqrt(filter_bias)
    return mean.astype(np.float32), whitening.astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_gradreg")
class ContrastNormalizeZCA(keras.layers.Layer):
    """GCN then ZCA whitening, with the ZCA statistics as fixed weights.

    Like `keras.layers.Normalization`, fit it on training data with
    `adapt(x)` before use; the statistics are non-trainable weights, saved
    with the model. For each example x (flattened to D values):

        z = (x - mean(x)) / (||x - mean(x)||_2 / scale)      # GCN
        out = (z - mu) @ W                                    # ZCA

    with mu and W = U diag(1 / sqrt(s + filter_bias)) U^T from the covariance
    U diag(s) U^T of the GCN'd training examples (`fit_zca`). The output has
    the input's shape. GCN removes the pixel scale, so fitting on uint8
    images and applying to [0, 1] floats gives the same output. Computed in
    float32 whatever the dtype policy; gradients stay finite on constant
    images (their GCN divisor is 1).

    ```python
    whitening = kgr.layers.ContrastNormalizeZCA()
    whitening.adapt(x_train)                     # (N, 32, 32, 3) images
    model = kgr.networks.conv_maxout_cifar10(preprocessing=whitening)
    ```

    Args:
        scale: GCN's L2 norm per example (pylearn2: 55), > 0.
        filter_bias: ZCA's eigenvalue bias (pylearn2: 1), > 0.
        **kwargs: As for `keras.layers.Layer` (`dtype` is always float32).
    """

    def __init__(self, scale: float = 55.0, filter_bias: float = 1.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0. Received: scale={scale!r}")
        if not filter_bias > 0:
            raise ValueError(f"`filter_bias` must be > 0. Received: filter_bias={filter_bias!r}")
        self.scale = float(scale)
        self.filter_bias = float(filter_bias)

    def build(self, input_shape):
        size = int(np.prod(input_shape[1:]))
        self.mean = self.add_weight(
            name="mean", shape=(size,), initializer="zeros", trainable=False
        )
        self.whitening = self.add_weight(
            name="whitening", shape=(size, size), initializer="identity", trainable=False
        )

    def adapt(self, x: np.ndarray) -> None:
        """Fits the GCN'd mean and the ZCA matrix on examples `x` (N, ...).

        Raises:
            ValueError: If `x` has fewer than 2 examples or another example
                shape than the layer was built for.
        """
        x = np.asarray(x)
        if x.ndim < 2 or len(x) < 2:
            raise ValueError(
                f"`adapt` needs a batch of at least 2 examples. Received: x.shape={x.shape}"
            )
        if self.built and int(np.prod(x.shape[1:])) != self.mean.shape[0]:
            raise ValueError(
                f"`adapt` got examples of {int(np.prod(x.shape[1:]))} values, the layer "
                f"was built for {self.mean.shape[0]}. Received: x.shape={x.shape}"
            )
        if not self.built:
            self.build((None, *x.shape[1:]))
        mean, whitening = fit_zca(global_contrast_normalize(x, self.scale), self.filter_bias)
        self.mean.assign(mean)
        self.whitening.assign(whitening)

    def call(self, inputs):
        shape = ops.shape(inputs)
        flat = ops.reshape(ops.cast(inputs, "float32"), (shape[0], -1))
        flat = flat - ops.mean(flat, axis=1, keepdims=True)
        # Constant images have norm 0: divide by 1 there, with a gradient that
        # stays finite (no sqrt of 0 on any branch).
        squares = ops.sum(ops.square(flat), axis=1, keepdims=True)
        small = squares < (MIN_DIVISOR * self.scale) ** 2
        norms = ops.sqrt(ops.where(small, ops.ones_like(squares), squares)) / self.scale
        norms = ops.where(small, ops.ones_like(norms), norms)
        whitened = ops.matmul(flat / norms - self.mean, self.whitening)
        return ops.reshape(whitened, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale, "filter_bias": self.filter_bias}


# Models saved before the layer moved from train/ into the library load too.
keras.saving.get_custom_objects()["keras_gradreg_train>ContrastNormalizeZCA"] = ContrastNormalizeZCA
