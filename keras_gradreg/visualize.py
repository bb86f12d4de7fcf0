"""Pictures of the worst-case perturbations r* per norm (`perturbations`).

The robustness curves are drawn by `kgr.RobustnessReport.plot`.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing
needs a screen and the global backend of the caller is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_gradreg._checks import check_clip, check_nonnegative
from keras_gradreg.attacks import loss_from_logits
from keras_gradreg.gradients import LossLike, input_gradients
from keras_gradreg.norms import PValue, canonical_p, worst_case_perturbation

DEFAULT_SIGMA = {1.0: 1.0, 2.0: 1.5, math.inf: 0.1}

__all__ = ["perturbations"]


def _sigmas(ps: Sequence[PValue], sigma: Any) -> dict[float, float]:
    ps = [canonical_p(p, "ps") for p in ps]
    if not ps:
        raise ValueError(f"`ps` must list at least one norm. Received: ps={ps!r}")
    if sigma is None or isinstance(sigma, Mapping):
        given = {canonical_p(k, "sigma"): v for k, v in (sigma or DEFAULT_SIGMA).items()}
        missing = [p for p in ps if p not in given]
        if missing:
            raise ValueError(
                f"`sigma` has no radius for p={missing[0]}; pass a number or a dict "
                f"with every p. Received: sigma={sigma!r}"
            )
        return {p: check_nonnegative(given[p], "sigma") for p in ps}
    value = check_nonnegative(sigma, "sigma")
    return {p: value for p in ps}


def _as_images(a: np.ndarray, image_shape: Sequence[int] | None) -> np.ndarray:
    """(n, H, W) or (n, H, W, 3) images from a batch of inputs."""
    n = a.shape[0]
    if image_shape is not None:
        if math.prod(image_shape) != math.prod(a.shape[1:]):
            raise ValueError(
                f"`image_shape` must hold the {math.prod(a.shape[1:])} values of one "
                f"input. Received: image_shape={tuple(image_shape)}"
            )
        a = a.reshape((n, *image_shape))
    elif a.ndim == 2:
        side = math.isqrt(a.shape[1])
        if side * side != a.shape[1]:
            raise ValueError(
                "Flat inputs must have a square number of features, or pass "
                f"`image_shape`. Received: image_shape=None for {a.shape[1]} features"
            )
        a = a.reshape(n, side, side)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise ValueError(
            "Inputs must be grey or RGB images (n, H, W[, 1 or 3]) or flat squares. "
            f"Received: image_shape={tuple(a.shape[1:])}"
        )
    return a


def _signed_image(r: np.ndarray) -> tuple[np.ndarray, dict, float]:
    """An r* image centred on 0: colour map for grey, 0.5 + r / 2max for RGB; and max |r|."""
    scale = float(np.max(np.abs(r))) or 1.0
    if r.ndim == 3:
        return 0.5 + r / (2 * scale), {}, scale
    return r, {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}, scale


def _colour_scale(figure: Figure, axis, image, rgb: bool, scale: float) -> None:
    """A colour bar giving r*'s values (for RGB: each channel's, on a grey scale)."""
    if rgb:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        image = ScalarMappable(Normalize(-scale, scale), cmap="gray")
    bar = figure.colorbar(image, ax=axis, fraction=0.046, pad=0.03)
    bar.set_ticks([-scale, 0.0, scale])
    bar.ax.tick_params(labelsize=6)
    bar.ax.yaxis.get_offset_text().set_fontsize(6)


def _true_labels(y: Any, count: int) -> np.ndarray:
    """Class indices from integer labels or one-hot rows."""
    labels = np.asarray(y)
    if labels.ndim > 1 and labels.shape[-1] > 1:
        return labels.reshape(count, -1).argmax(axis=1)
    return labels.reshape(count)


def _save(figure: Figure, path: str) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)


def _draw_norm(figure, axes, name, r_images, moved, moved_labels, grey) -> None:
    """The r* and x + r* columns of one norm (`axes`: rows x 2)."""
    for row in range(len(r_images)):
        image, style, scale = _signed_image(r_images[row])
        drawn = axes[row, 0].imshow(image, **style)
        _colour_scale(figure, axes[row, 0], drawn, r_images.ndim == 4, scale)
        axes[row, 0].set_title(f"r*, {name}", fontsize=8)
        axes[row, 1].imshow(
            np.clip(moved[row], 0, 1) if moved.ndim == 4 else moved[row],
            **(grey if moved.ndim == 3 else {}),
        )
        axes[row, 1].set_title(f"x + r*: pred {moved_labels[row]}", fontsize=8)


def perturbations(
    model: keras.Model,
    x: Any,
    y: Any,
    ps: Sequence[PValue] = (1, 2, math.inf),
    sigma: float | Mapping[PValue, float] | None = None,
    path: str = "perturbations.png",
    loss: LossLike = None,
    clip: tuple[Any, Any] | None = (0.0, 1.0),
    image_shape: Sequence[int] | None = None,
) -> dict[float, np.ndarray]:
    """Draws each input, its worst-case perturbation r* per norm and x + r*.

    r* is the family's closed form for the gradient of each example's own
    loss (docs/method.md), as in the paper's figures: for a regularised model it
    looks like strokes, for a plain one like noise. Rows are examples;
    columns are the input (titled with its true label and the model's
    prediction), then for each p: r* (red up, blue down, with a colour bar
    of its values) and clip(x + r*) (titled with the prediction there).

    Args:
        model: A Keras classifier.
        x: A small batch of images: (n, H, W), (n, H, W, 1 or 3), or flat
            (n, H * W) with H = W or `image_shape` given.
        y: Labels for `loss`.
        ps: Norms of the perturbation balls, each >= 1.
        sigma: A radius for every p, or a dict {p: radius}; None for
            `DEFAULT_SIGMA` (inputs in [0, 1]).
        path: Where to write the PNG.
        loss: A Keras loss; None for the model's compiled loss.
        clip: The box x + r* is clipped to for display, or None.
        image_shape: Shape of one image when `x` is flat and not square.

    Returns:
        r* per p (as floats, inf for the max-norm), NumPy arrays shaped like `x`.
    """
    sigmas = _sigmas(ps, sigma)
    clip = check_clip(clip)
    x = np.asarray(x, dtype="float32")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"`x` must be a non-empty batch. Received: x with shape {x.shape}")
    images = _as_images(x, image_shape)  # Checks the shape before any work.
    gradient = input_gradients(model, x, y, loss)
    from_logits = loss_from_logits(model, loss)
    steps = {p: np.asarray(worst_case_perturbation(gradient, p, s)) for p, s in sigmas.items()}

    def predicted(batch):
        out = np.asarray(model(batch, training=False)).reshape(len(batch), -1)
        if out.shape[1] > 1:
            return out.argmax(axis=1)
        return (out[:, 0] > (0.0 if from_logits else 0.5)).astype(int)

    low, high = (None, None) if clip is None else clip
    shown = {p: x + r if clip is None else np.clip(x + r, low, high) for p, r in steps.items()}
    grey = {"cmap": "gray"}
    if clip is not None and np.ndim(low) == 0 and np.ndim(high) == 0:
        grey.update(vmin=float(low), vmax=float(high))
    columns = 1 + 2 * len(steps)
    figure = Figure(figsize=(1.6 * columns, 1.7 * len(x) + 0.4))
    axes = figure.subplots(len(x), columns, squeeze=False)
    labels, true = predicted(x), _true_labels(y, len(x))
    for row in range(len(x)):
        axes[row, 0].imshow(images[row], **(grey if images.ndim == 3 else {}))
        axes[row, 0].set_title(f"true {true[row]}, pred {labels[row]}", fontsize=8)
    for k, (p, r) in enumerate(steps.items()):
        _draw_norm(
            figure,
            axes[:, 1 + 2 * k : 3 + 2 * k],
            f"p={p:g}, σ={sigmas[p]:g}",
            _as_images(r, image_shape),
            _as_images(shown[p], image_shape),
            predicted(shown[p]),
            grey,
        )
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    _save(figure, path)
    return steps
