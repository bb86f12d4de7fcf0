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
