"""README.md and docs/*.md: their Python blocks run as written, their relative links resolve.

Every Python block is either marked as run by a named test (the blocks of
this file's tests, of tests/test_objective.py, tests/test_mixed_precision.py
and tests/test_readme_promises.py) or marked `not run` with the reason. The
blocks run here get small random data of MNIST's shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from readme_code import GUIDE, PAGES, README, ROOT, blocks, code_block

import keras_gradreg as kgr

# ---------------------------------------------------------------------- #
# Every Python block is run by a test or says it is not.
# ---------------------------------------------------------------------- #


def test_every_python_block_is_run_by_a_named_test_or_marked_not_run():
    run = []
    for path in PAGES:
        for marker, language, _ in blocks(path):
            if language != "python":
                continue
            assert marker, f"{path.name}: a Python block without a run or not-run marker"
            if marker.startswith("not run:"):
                continue
            name, rest = marker.split(":", 1)
            tests = re.findall(r"tests/(\w+\.py)", rest)
            assert rest.strip().startswith("run by") and tests, f"{path.name}: {marker!r}"
            for test in tests:  # Each test it names fetches the block by its name.
                assert f'"{name}"' in (ROOT / "tests" / test).read_text(), (path.name, name, test)
            run.append((path.name, name))
    assert ("README.md", "short-example") in run and ("guide.md", "custom-loop") in run, run


# ---------------------------------------------------------------------- #
# Relative links.
# ---------------------------------------------------------------------- #

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of `path`'s headings (repeated ones get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", path.read_text()), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slug_is_github_s():
    assert slug("What `fit` does") == "what-fit-does"
    assert slug("XLA, several devices, several machines") == "xla-several-devices-several-machines"
    heading = "MNIST (`python -m experiments.reproduce`)"
    assert slug(heading) == "mnist-python--m-experimentsreproduce"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Each relative link (and image) names an existing file, and its anchor a heading."""
    checked = 0
    for link, image in LINK.findall(FENCE.sub("", path.read_text())):
        target = link or image
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.name}: no heading for {target}"
        checked += 1
    assert checked > 0 or path.name not in ("README.md", "guide.md", "results.md")


# ---------------------------------------------------------------------- #
# The blocks, run as written.
# ---------------------------------------------------------------------- #


def mnist_shaped(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 784)).astype("float32"), rng.integers(0, 10, size=n)


def run(path, name, **given):
    namespace = {"__name__": f"docs_{name}", **given}
    exec(compile(code_block(path, name), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def test_method_block_builds_pgd_and_trades_training():
    """README, "The method in a few lines": the regularizers it builds have its settings."""
    namespace = run(README, "method")
    pgd = namespace["pgd_at"].get_config()
    assert (pgd["p"], pgd["sigma"], pgd["method"], pgd["steps"]) == ("inf", 0.3, "adversarial", 10)
    assert pgd["random_start"] is True and pgd["clip"] == [0, 1]
    assert pgd["clean_weight"] == 0.0  # Madry et al.'s: the adversarial loss alone.
    trades = namespace["trades"].get_config()
    assert (trades["method"], trades["beta"], trades["sigma"]) == ("trades", 6.0, 0.3)


def test_short_example_trains_the_regularised_objective(capsys):
    """README, "In code": one epoch of the maxout MLP on 200 random MNIST-shaped images;
    the logged loss is the data loss plus the penalty, which is positive."""
    x_train, y_train = mnist_shaped()
    x_train = x_train.reshape(-1, 28, 28, 1)
    namespace = run(README, "short-example", x_train=x_train, y_train=y_train)
    model = namespace["model"]
    assert model.count_params() == 784 * 1200 + 1200 + 240 * 1200 + 1200 + 240 * 10 + 10
    history = model.history.history
    assert history["penalty"][0] > 0
    np.testing.assert_allclose(
        history["loss"][0], history["data_loss"][0] + history["penalty"][0], rtol=1e-5
    )
    assert model.regularizer.get_config()["sigma"] == pytest.approx(0.1)
    assert model(x_train[:3]).shape == (3, 10)


def test_networks_block_builds_the_paper_s_networks():
    """docs/guide.md, "Layers and networks": the last model built is the CIFAR-10 conv
    maxout network with the whitening layer fitted on the given images."""
    images = np.random.default_rng(1).uniform(size=(20, 32, 32, 3)).astype("float32")
    reg = kgr.GradientRegularizer(p=2, sigma=0.1)
    namespace = run(GUIDE, "networks", kgr=kgr, reg=reg, cifar_train_images=images)
    model = namespace["model"]
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    whitening = namespace["whitening"]
    assert any(layer is whitening for layer in model._flatten_layers())
    out = keras.ops.convert_to_numpy(whitening(images))
    # ZCA whitening of its own training images: mean 0 per pixel.
    np.testing.assert_allclose(out.reshape(20, -1).mean(axis=0), 0.0, atol=1e-3)


def test_cheaper_block_sets_every_and_fraction():
    """docs/guide.md, "Cheaper regularization": the second regularizer replaces the first."""
    namespace = run(GUIDE, "cheaper", kgr=kgr)
    config = namespace["reg"].get_config()
    assert (config["sigma"], config["every"], config["fraction"]) == (0.3, 1, 0.25)


def test_schedules_block_warms_sigma_up_as_its_comment_says():
    """docs/guide.md, "Schedules": 40 epochs of a one-step epoch; sigma logged 0.06,
    0.12, ..., 0.3, then 0.3; the second scheduler sets sigma and clean_weight."""
    x_train, y_train = mnist_shaped(16)
    model = kgr.regularize(
        keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)]),
        kgr.GradientRegularizer(p=2, sigma=0.3),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    namespace = run(GUIDE, "schedules", kgr=kgr, model=model, x_train=x_train, y_train=y_train)
    sigmas = model.history.history["sigma"]
    np.testing.assert_allclose(sigmas[:6], [0.06, 0.12, 0.18, 0.24, 0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(sigmas, [0.3 * min(1, (e + 1) / 5) for e in range(40)], rtol=1e-6)
    assert namespace["schedule"].schedule(7) == {"sigma": 0.1, "clean_weight": 0.5}
