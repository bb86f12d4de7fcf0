"""Tests of train.config (fields, presets) and train.main's flags."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from train import config as config_lib
from train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def parse():
    """Parses argv into train.main's flags; restores them afterwards."""

    def run(*args):
        main.FLAGS(["train.main", "--workdir=/tmp/unused", *args])
        return main.config_from_flags()

    yield run
    main.FLAGS.unparse_flags()


def test_presets_hold_the_papers_settings():
    conv = config_lib.make_config("mnist_conv_maxout")
    assert (conv.model, conv.p, conv.sigma, conv.batch_size) == (
        "conv_maxout_mnist",
        math.inf,
        0.1,
        128,
    )
    mlp = config_lib.make_config("mnist_maxout_mlp")
    assert (mlp.model, mlp.p, mlp.batch_size, mlp.dataset) == ("maxout_mlp", 2.0, 100, "mnist")
    assert (mlp.input_dropout, mlp.hidden_dropout, mlp.max_norm) == (0.2, 0.5, 1.9365)
    assert config_lib.make_config("mnist_sigmoid_mlp").model == "sigmoid_mlp"
    cifar = config_lib.make_config("cifar10_conv_maxout")
    assert (cifar.dataset, cifar.model) == ("cifar10", "conv_maxout_cifar10")
    for name in config_lib.PRESETS:
        assert config_lib.make_config(name).preset == name


def test_overrides_replace_preset_values_and_are_validated():
    config = config_lib.make_config("mnist_conv_maxout", sigma=0.2, epochs=3)
    assert (config.sigma, config.epochs, config.p) == (0.2, 3, math.inf)
    with pytest.raises(ValueError, match=r"sigma=-1"):
        config_lib.make_config("mnist_conv_maxout", sigma=-1)
    with pytest.raises(ValueError, match="preset='mnist_resnet'"):
        config_lib.make_config("mnist_resnet")
    with pytest.raises(ValueError, match="Unknown config fields"):
        config_lib.make_config(sigmaa=0.1)
    with pytest.raises(ValueError, match="hidden_units"):
        config_lib.make_config("mnist_conv_maxout", hidden_units=(10,))
    with pytest.raises(ValueError, match="min_learning_rate=0.5"):
        config_lib.make_config(learning_rate=0.1, min_learning_rate=0.5)


def test_to_dict_is_json_with_inf_as_string():
    values = config_lib.make_config("mnist_conv_maxout").to_dict()
    assert json.loads(json.dumps(values)) == values
    assert values["p"] == "inf" and values["eval_suite"] == "standard"
    assert config_lib.make_config(p=values["p"]).p == math.inf


def test_flags_override_the_preset(parse):
    config = parse("--preset=mnist_conv_maxout", "--sigma=0.25", "--eval_epsilons_2=0.5,1")
    assert config.model == "conv_maxout_mnist"
    assert config.p == math.inf  # From the preset.
    assert config.sigma == 0.25 and config.eval_epsilons_2 == (0.5, 1.0)


def test_regularizer_fields_come_from_gradient_regularizer(parse):
    """Names, defaults and checks of the regularization flags are GradientRegularizer's."""
    import inspect

    import keras_gradreg as kgr

    parameters = inspect.signature(kgr.GradientRegularizer).parameters
    assert config_lib.REGULARIZER_FIELDS == tuple(parameters)
    for name, parameter in parameters.items():
        field = config_lib.FIELDS_BY_NAME[name]
        assert field.group == "regularization" and field.default == parameter.default
        assert field.help and not field.help.startswith("GradientRegularizer's")
    config = parse("--method=adversarial", "--clean_weight=0.5", "--p=inf")
    assert config.regularizer() == kgr.GradientRegularizer(
        p="inf", method="adversarial", clean_weight=0.5
    )
    assert config_lib.make_config().regularizer() == kgr.GradientRegularizer()


def test_argument_docs_reads_google_style_args():
    doc = """Summary.

    Args:
        a: First line
            continued.
        b: Second.

    Returns:
        c: not an argument.
    """
    assert config_lib._argument_docs(doc) == {"a": "First line continued.", "b": "Second."}


def test_print_config_prints_the_resolved_settings_and_exits(capsys):
    main.FLAGS(["train.main", "--preset=mnist_maxout_mlp", "--sigma=0.3", "--print_config"])
    try:
        main.main(["train.main"])
    finally:
        main.FLAGS.unparse_flags()
    printed = json.loads(capsys.readouterr().out)
    expected = config_lib.make_config("mnist_maxout_mlp", sigma=0.3).to_dict()
    assert printed == expected and printed["epochs"] == 50 and printed["sigma"] == 0.3


def test_help_shows_groups_and_preset_settings():
    main.FLAGS(["train.main", "--print_config"])
    try:
        text = main.FLAGS.get_help()
    finally:
        main.FLAGS.unparse_flags()
    headings = [line for line in text.splitlines() if line.endswith("flags of train.main:")]
    assert headings == [
        f"{i}. {g} flags of train.main:" for i, g in enumerate(config_lib.GROUPS, 1)
    ]
    sigma = text.index("--sigma:")
    assert text.index(headings[2]) < sigma < text.index(headings[3])
    help_text = " ".join(main.FLAGS["preset"].help.split())
    assert "mnist_maxout_mlp: dataset=mnist, model=maxout_mlp, p=2, sigma=0.1" in help_text
    assert "epochs=50" in help_text


def test_flag_types(parse):
    config = parse("--p=inf", "--hidden_units=32,16", "--nojit_compile", "--eval_suite=none")
    assert config.p == math.inf and config.hidden_units == (32, 16)
    assert config.jit_compile is False and config.eval_suite == "none"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--sigma=-0.5", "flag --sigma=-0.5: `sigma` must be a finite number >= 0"),
        ("--p=0.5", "flag --p=0.5: `p` must be a number >= 1"),
        ("--method=exact", "flag --method=exact: `method` must be one of"),
        ("--batch_size=0", "flag --batch_size=0: `batch_size` must be an integer >= 1"),
        ("--validation_split=1", "flag --validation_split=1.0:"),
        ("--eval_suite=plus", "flag --eval_suite=plus: `eval_suite` must be one of"),
        ("--eval_square_queries=0", "flag --eval_square_queries=0:"),
        ("--data_npz=/no/such.npz", "flag --data_npz=/no/such.npz: `data_npz` must be an existing"),
        ("--strategy=tpu", "flag --strategy=tpu:"),
    ],
)
def test_bad_flag_values_name_the_flag(parse, arg, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse(arg)


@pytest.mark.slow  # Runs the binary in a subprocess.
def test_bad_flag_fails_before_any_work(tmp_path):
    """The binary exits with the flag's message and creates no workdir."""
    workdir = tmp_path / "run"

    def run_binary(*flags):
        command = [sys.executable, "-m", "train.main", f"--workdir={workdir}", *flags]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    for args, message in (
        (["--clean_weight=2"], "flag --clean_weight=2.0: `clean_weight` must be in [0, 1]"),
        (["--preset=mnist_conv_maxout", "--hidden_units=10"], "hidden_units=(10,)"),
    ):
        result = run_binary(*args)
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if "train.main: error:" in line]
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not workdir.exists()


@pytest.mark.slow  # Runs the binary in a subprocess.
def test_every_and_fraction_flags_are_typed_and_validated(parse):
    """`--helpfull` lists --every as an integer and --fraction as a number, both validated."""
    import keras_gradreg as kgr

    result = subprocess.run(
        [sys.executable, "-m", "train.main", "--helpfull"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]  # absl's help flags exit with 1.
    for name, kind in (("every", "(an integer)"), ("fraction", "(a number)")):
        entry = result.stdout[result.stdout.index(f"--{name}:") :]
        entry = entry[: entry.index("\n  --")]
        assert "[regularization]" in entry and kind in entry, entry
    assert "(default: '1')" in result.stdout[result.stdout.index("--every:") :]
    config = parse("--every=4", "--fraction=0.25")
    assert (config.every, config.fraction) == (4, 0.25)
    assert config.regularizer() == kgr.GradientRegularizer(every=4, fraction=0.25)
    main.FLAGS.unparse_flags()
    for arg, message in (
        ("--every=0", "flag --every=0: `every` must be an integer >= 1. Received: every=0"),
        ("--every=2.5", "flag --every=2.5: invalid literal for int()"),
        ("--fraction=0", "flag --fraction=0.0: `fraction` must be a number in (0, 1]"),
        ("--fraction=1.5", "flag --fraction=1.5: `fraction` must be a number in (0, 1]"),
    ):
        with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
            parse(arg)
        main.FLAGS.unparse_flags()


# --------------------------------------------------------------------------- #
# The CNN preset, its model flags, the ascent/TRADES flags and the sigma ramp.
# --------------------------------------------------------------------------- #


def _built(config):
    """The network `train_lib.make_model` builds for `config` (MNIST shapes)."""
    import types

    from train import train_lib

    return train_lib.make_model(
        config, types.SimpleNamespace(input_shape=(28, 28, 1), num_classes=10)
    )


def test_mnist_cnn_preset_is_madrys_network_at_linf_03():
    config = config_lib.make_config("mnist_cnn")
    assert (config.model, config.activation, config.p, config.sigma) == (
        "cnn",
        "relu",
        math.inf,
        0.3,
    )
    assert (config.input_dropout, config.hidden_dropout, config.max_norm) == (0.0, 0.0, 0.0)
    assert config.jit_compile is True  # The pooling's double backward is exact under XLA.
    model = _built(config)
    # 5*5*32 + 32, 5*5*32*64 + 64, 7*7*64*1024 + 1024, 1024*10 + 10; no dropout, no max-norm.
    assert model.count_params() == 832 + 51_264 + 3_212_288 + 10_250
    assert not [layer for layer in model.layers if "dropout" in layer.name]
    assert all(getattr(layer, "kernel_constraint", None) is None for layer in model.layers)
    assert model.regularizer == config.regularizer()


def test_cnn_width_and_activation_flags(parse):
    config = parse("--preset=mnist_cnn", "--conv_channels=16,32", "--dense_units=128")
    assert (config.conv_channels, config.dense_units) == ((16, 32), 128)
    # 5*5*16 + 16, 5*5*16*32 + 32, 7*7*32*128 + 128, 128*10 + 10.
    assert _built(config).count_params() == 416 + 12_832 + 200_832 + 1_290
    main.FLAGS.unparse_flags()
    config = parse(
        "--preset=mnist_cnn", "--conv_channels=16,32", "--dense_units=128",
        "--activation=maxout", "--pieces=3",
    )  # fmt: skip
    model = _built(config)
    assert model.count_params() == 1_248 + 38_496 + 602_496 + 1_290  # 3 pieces per unit.
    assert model.get_layer("maxout_2").num_units == 128
    main.FLAGS.unparse_flags()
    config = parse("--preset=mnist_cnn", "--activation=maxout")  # The builder's 2 pieces.
    assert config.pieces is None and _built(config).get_layer("conv_0").filters == 64
    main.FLAGS.unparse_flags()
    for activation in ("gelu", "softplus"):
        model = _built(parse("--preset=mnist_cnn", f"--activation={activation}"))
        assert model.get_layer("dense_2").activation.__name__ == activation
        main.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": "maxout_mlp", "dense_units": 5}, "Received: dense_units=5"),
        ({"model": "maxout_mlp", "activation": "gelu"}, "Received: activation='gelu'"),
        ({"model": "cnn", "first_conv_max_norm": 0.5}, "Received: first_conv_max_norm=0.5"),
        ({"model": "cnn", "hidden_units": (10,)}, r"Received: hidden_units=\(10,\)"),
        ({"model": "cnn", "pieces": 3}, "Received: pieces=3, activation='relu'"),
        ({"model": "cnn", "activation": "gelu", "pieces": 3}, "activation='gelu'"),
        ({"model": "cnn", "conv_channels": (16, 0)}, r"conv_channels=\(16, 0\)"),
        ({"model": "cnn", "activation": "swirl"}, "Received: activation='swirl'"),
        ({"method": "penalty", "beta": 3.0}, "`beta` does not apply to method='penalty'"),
        ({"method": "trades", "clean_weight": 0.5}, "`clean_weight` does not apply"),
        ({"method": "adversarial", "steps": 3, "p": 3}, "p must be 1, 2 or inf"),
        ({"method": "trades", "clip": (1, 0)}, r"Received: clip=\(1.0, 0.0\)"),
        ({"method": "trades", "beta": -1}, "Received: beta=-1"),
        ({"sigma_warmup_epochs": -1}, "Received: sigma_warmup_epochs=-1"),
        ({"sigma_warmup_epochs": 2.5}, "Received: sigma_warmup_epochs=2.5"),
    ],
)
def test_settings_that_do_not_fit_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.make_config(**overrides)


def test_ascent_and_trades_flags_reach_the_regularizer(parse):
    """Flags of the arguments with None defaults take a value or "none"; clip is low,high."""
    import keras_gradreg as kgr

    config = parse(
        "--p=inf", "--method=trades", "--steps=5", "--step_size=0.1", "--clip=0,1", "--beta=3"
    )
    assert (config.steps, config.step_size, config.clip, config.beta) == (5, 0.1, (0.0, 1.0), 3.0)
    assert config.regularizer() == kgr.GradientRegularizer(
        p="inf", method="trades", steps=5, step_size=0.1, clip=(0.0, 1.0), beta=3.0
    )
    main.FLAGS.unparse_flags()
    config = parse(
        "--p=inf", "--method=adversarial", "--random_start", "--steps=none", "--clip=none",
        "--clean_weight=none",
    )  # fmt: skip
    assert (config.steps, config.clip, config.clean_weight, config.random_start) == (
        None, None, None, True,
    )  # fmt: skip
    regularizer = config.regularizer()
    # The method's defaults: one step of 1.25 sigma from a random start (fast FGSM), clean_weight 0.
    assert (regularizer.steps, regularizer.step_size, regularizer.clean_weight) == (1, 1.25, 0.0)
    main.FLAGS.unparse_flags()
    regularizer = parse("--method=trades").regularizer()
    assert (regularizer.steps, regularizer.step_size, regularizer.beta) == (10, 0.25, 6.0)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--steps=0", "flag --steps=0: `steps` must be an integer >= 1. Received: steps=0"),
        ("--step_size=0", "flag --step_size=0.0: `step_size` must be"),
        ("--beta=-1", "flag --beta=-1.0: `beta` must be"),
        ("--clip=1,0", "flag --clip=['1', '0']: `clip` must be a pair (low, high) with low < high"),
        ("--clip=a,b", "`clip` must be None or two numbers low,high. Received: clip=['a', 'b']"),
        ("--clip=0,1,2", "`clip` must be None or a pair (low, high)."),
        ("--dense_units=0", "flag --dense_units=0: `dense_units` must be an integer >= 1"),
        ("--pieces=0", "flag --pieces=0: `pieces` must be an integer >= 1"),
        ("--conv_channels=16,0", "flag --conv_channels=['16', '0']: `conv_channels` must be"),
        ("--activation=swirl", "flag --activation=swirl: `activation` must be one of"),
        ("--sigma_warmup_epochs=-1", "flag --sigma_warmup_epochs=-1: `sigma_warmup_epochs` must"),
    ],
)
def test_bad_new_flag_values_name_the_flag(parse, arg, message):
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
        parse(arg)


def test_print_config_with_the_new_settings_round_trips(capsys):
    """The printed JSON (None as null, clip as a list) makes the same config again."""
    args = [
        "--preset=mnist_cnn", "--activation=maxout", "--pieces=3", "--conv_channels=16,32",
        "--method=trades", "--clip=0,1", "--sigma_warmup_epochs=5", "--print_config",
    ]  # fmt: skip
    main.FLAGS(["train.main", *args])
    try:
        main.main(["train.main"])
        config = main.config_from_flags()
    finally:
        main.FLAGS.unparse_flags()
    printed = json.loads(capsys.readouterr().out)
    assert printed == config.to_dict()
    assert (printed["clip"], printed["steps"], printed["beta"]) == ([0.0, 1.0], None, None)
    assert (printed["pieces"], printed["conv_channels"], printed["dense_units"]) == (
        3,
        [16, 32],
        None,
    )
    settings = {k: v for k, v in printed.items() if k != "preset"}
    assert config_lib.make_config(printed["preset"], **settings) == config


def test_comparable_settings_resolve_the_regularizers_defaults():
    """clean_weight recorded as 0.0 (its old default) is the default None's 0.0."""
    current = config_lib.make_config().to_dict()
    old = {**current, "clean_weight": 0.0, "fd_step": 0.01}
    for name in ("steps", "step_size", "random_start", "clip", "beta"):
        del old[name]
    assert config_lib.comparable_settings(old) == {
        k: v for k, v in config_lib.comparable_settings(current).items() if k in old
    }
    trades = config_lib.make_config(method="trades").to_dict()
    resolved = config_lib.comparable_settings(trades)
    assert (resolved["steps"], resolved["step_size"], resolved["beta"]) == (10, 0.25, 6.0)
    assert resolved["clean_weight"] is None  # Not an argument of "trades".


def _small_mnist_npz(path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, size=(32, 28, 28)).astype("uint8"),
        y_train=rng.integers(0, 10, size=32).astype("uint8"),
        x_test=rng.integers(0, 256, size=(8, 28, 28)).astype("uint8"),
        y_test=rng.integers(0, 10, size=8).astype("uint8"),
    )
    return str(path)


def test_sigma_warmup_callback_sets_the_numpy_ramp():
    import numpy as np

    import keras_gradreg as kgr
    from train import train_lib

    assert train_lib.sigma_warmup(config_lib.make_config(sigma=0.3)) == []
    config = config_lib.make_config(sigma=0.3, sigma_warmup_epochs=4)
    (callback,) = train_lib.sigma_warmup(config)
    model = kgr.networks.mlp((4,), 3, hidden_units=(2,), regularizer=config.regularizer())
    callback.set_model(model)
    values = []
    for epoch in (0, 1, 2, 3, 4, 5, 1):  # Epochs from 0; the last as after a resume.
        callback.on_epoch_begin(epoch)
        values.append(model.regularizer.sigma)
    expected = 0.3 * np.minimum(1.0, np.array([1, 2, 3, 4, 5, 6, 2]) / 4.0)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.slow
def test_sigma_warmup_follows_the_linear_ramp_and_resumes(tmp_path):
    """train/sigma of each epoch is sigma * min(1, epoch / N), also after a resume."""
    import numpy as np

    from train import train_lib

    settings = dict(
        preset="mnist_maxout_mlp", data_npz=_small_mnist_npz(tmp_path / "d.npz"),
        hidden_units=(8,), sigma=0.3, sigma_warmup_epochs=3, batch_size=8, steps_per_epoch=2,
        jit_compile=False, eval_suite="none", pictures=False,
    )  # fmt: skip
    ramp = np.float32(0.3) * np.minimum(1.0, np.arange(1, 6) / 3.0).astype(np.float32)

    def sigmas(workdir, epochs):
        config = config_lib.make_config(**{**settings, "epochs": epochs})
        metrics = train_lib.train_and_evaluate(config, str(workdir))
        return [record["train/sigma"] for record in metrics["epochs"]], metrics

    whole, _ = sigmas(tmp_path / "whole", 5)
    np.testing.assert_allclose(whole, ramp, rtol=1e-6)
    assert whole[-1] == pytest.approx(0.3) and whole[0] == pytest.approx(0.1)
    sigmas(tmp_path / "resumed", 2)  # Stopped after epoch 2 (sigma 0.2) ...
    resumed, metrics = sigmas(tmp_path / "resumed", 5)  # ... and continued from epoch 3.
    assert metrics["resumed_from_epoch"] == 2
    np.testing.assert_allclose(resumed, ramp, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        dict(method="trades", steps=2, clip=(0.0, 1.0), beta=3.0),
        dict(method="adversarial", steps=3, random_start=True, clip=(0.0, 1.0), clean_weight=0.25),
    ],
    ids=["trades", "pgd"],
)
def test_the_binary_trains_the_ascent_members_on_the_cnn(tmp_path, settings):
    """Two steps of each new member on a narrow CNN; each epoch's logs fit the objective.

    TRADES: loss = L(x) + beta KL, `penalty` = beta KL. Adversarial: loss =
    clean_weight L(x) + (1 - clean_weight) L(x + r), `penalty` = L(x + r).
    """
    import numpy as np

    from train import train_lib

    config = config_lib.make_config(
        "mnist_cnn", data_npz=_small_mnist_npz(tmp_path / "d.npz"), conv_channels=(4, 8),
        dense_units=16, activation="gelu", sigma=0.3, sigma_warmup_epochs=2, epochs=2,
        batch_size=8, steps_per_epoch=2, eval_suite="none", pictures=False, **settings,
    )  # fmt: skip
    metrics = train_lib.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["flags"] == config.to_dict() and metrics["status"] == "done"
    for record, sigma in zip(metrics["epochs"], (0.15, 0.3)):
        assert record["train/sigma"] == pytest.approx(sigma)
        assert record["train/penalty"] > 0
        clean = config.clean_weight if config.method == "adversarial" else 1.0
        moved = 1.0 - clean if config.method == "adversarial" else 1.0
        assert record["train/loss"] == pytest.approx(
            clean * record["train/data_loss"] + moved * record["train/penalty"], rel=1e-5
        )
    assert np.isfinite(metrics["final"]["test/loss"])


def test_help_names_the_types_of_the_flags_with_none_defaults():
    main.FLAGS(["train.main", "--print_config"])
    try:
        text = main.FLAGS.get_help()
    finally:
        main.FLAGS.unparse_flags()
    for name, kind in (
        ("steps", "(an integer or none)"),
        ("step_size", "(a number or none)"),
        ("beta", "(a number or none)"),
        ("clean_weight", "(a number or none)"),
        ("clip", "(a comma separated list or none)"),
        ("dense_units", "(an integer or none)"),
        ("sigma_warmup_epochs", "(an integer)"),
    ):
        entry = text[text.index(f"--{name}:") :]
        entry = " ".join(entry[: entry.index("\n  --")].split())
        assert kind in entry, entry
    assert "--[no]random_start:" in text
