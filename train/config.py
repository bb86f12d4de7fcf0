"""The training configuration: validated fields, defaults and presets.

One place for every setting of the binary. `FIELDS` lists each setting's
group, default, help and check; `Config` is generated from it and validates
every field on construction (a bad value raises `ValueError` naming the field
and the value received), and the flags of `train.main` are generated from it
too. The regularization fields are derived from `kgr.GradientRegularizer`'s
signature and validated by it, so its defaults are written once. A preset sets
the values of one of the paper's experiments; flags given explicitly override
it. The presets stay dicts over this table rather than ml_collections config
files (Flax's way) because the table already gives each setting its type,
check, help and flag, derived from the library for the regularizer, which
config files would write a second time.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from keras_gradreg import _checks
from keras_gradreg.networks import NETWORKS
from keras_gradreg.networks.cnn import ACTIVATIONS, check_activation
from keras_gradreg.regularizer import METHODS, GradientRegularizer

DATASETS = ("mnist", "fashion_mnist", "cifar10")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "exponential", "cosine")
STRATEGIES = ("one_device", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
EVAL_SUITES = ("standard", "fast", "none")


# --------------------------------------------------------------------------- #
# Checks: each takes a raw value (a flag's or a preset's) and the field's name,
# and returns the normalised value or raises ValueError in `kgr`'s wording
# (`keras_gradreg._checks`: "`name` must be .... Received: name=value").
# --------------------------------------------------------------------------- #


def _one_of(options: Sequence[str]) -> Callable[[Any, str], str]:
    return lambda value, name: _checks.check_choice(value, name, options)


def _at_least(minimum: int) -> Callable[[Any, str], int]:
    return lambda value, name: _checks.check_count(value, name, minimum)


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """`check`, letting None through (the network's or the method's default)."""
    return lambda value, name: None if value is None else check(value, name)


def _activation(value: Any, name: str) -> str | None:
    if value is None:
        return None
    try:
        check_activation(value, 2)
    except ValueError:
        _checks.fail(name, f"one of {ACTIVATIONS} or another Keras activation name", value)
    return value


def _optional_path(must_be_file: bool) -> Callable[[Any, str], str | None]:
    def check(value: Any, name: str) -> str | None:
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            _checks.fail(name, "a path", value)
        if must_be_file and not os.path.isfile(value):
            _checks.fail(name, "an existing file", value)
        return value

    return check


def _converted_list(name: str, value: Any, convert: Callable, requirement: str) -> tuple:
    """`value` (a non-string sequence) with `convert` applied to each item."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        _checks.fail(name, requirement, value)
    try:
        return tuple(convert(v) for v in value)
    except (TypeError, ValueError):
        _checks.fail(name, requirement, value)


def _radii(value: Any, name: str) -> tuple[float, ...]:
    requirement = "a list of finite numbers >= 0"
    numbers = _converted_list(name, value, float, requirement)
    if any(not math.isfinite(v) or v < 0 for v in numbers):
        _checks.fail(name, requirement, value)
    return numbers


def _int_list(value: Any, name: str) -> tuple[int, ...]:
    requirement = "a list of positive integers"
    numbers = _converted_list(name, value, int, requirement)
    if any(v < 1 for v in numbers) or any(isinstance(v, float) and v != int(v) for v in value):
        _checks.fail(name, requirement, value)
    return numbers


# --------------------------------------------------------------------------- #
# Fields.
# --------------------------------------------------------------------------- #

# Flag groups, in the order `--helpfull` shows them.
GROUPS = ("data", "model", "regularization", "optimization", "runtime", "evaluation")


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting: flag group, default, help text, check and flag type.

    `kind` is the flag's type: "bool", "int", "float", "str" or "list"
    (derived from the default unless given).
    """

    name: str
    group: str
    default: Any
    help: str
    check: Callable[[Any, str], Any]
    kind: str = ""

    def __post_init__(self):
        if self.group not in GROUPS:
            raise AssertionError(f"Field {self.name}: unknown group {self.group!r}")
        if not self.kind:
            kind = {bool: "bool", int: "int", float: "float", tuple: "list"}.get(
                type(self.default), "str"
            )
            object.__setattr__(self, "kind", kind)


def _argument_docs(docstring: str) -> dict[str, str]:
    """The one-paragraph description of each argument in a Google-style `Args:` section."""
    docs: dict[str, str] = {}
    lines = (docstring or "").splitlines()
    if not any(line.strip() == "Args:" for line in lines):
        return docs
    start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    indent, name = None, None
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        if depth == indent and ":" in line:
            name, text = line.strip().split(":", 1)
            docs[name] = text.strip()
        elif name is not None:
            docs[name] += " " + line.strip()
    return docs


def _regularizer_check(name: str, kind: str) -> Callable[[Any, str], Any]:
    """Validates one argument by `kgr.GradientRegularizer` itself.

    None (the method's default) passes. Another value is given to a
    regularizer of the first method that takes the argument (`beta` only
    exists for "trades"), so a value is refused for being out of range, not
    for the default method; whether it fits the run's `method` is checked
    with all the arguments together. A "list" value (`clip`, from a flag:
    strings) is converted to numbers first.
    """

    def check(value: Any, field_name: str) -> Any:
        if value is None:
            return None
        if kind == "list":
            value = _converted_list(name, value, float, "None or two numbers low,high")
        errors = []
        for method in (None, *METHODS):
            arguments = {name: value} if method is None else {"method": method, name: value}
            try:
                regularizer = GradientRegularizer(**arguments)
            except ValueError as error:
                errors.append(error)
                continue
            return value if kind == "list" else getattr(regularizer, name, value)
        # An error about the value rather than about the method, if any.
        about_value = [e for e in errors if "does not apply" not in str(e)]
        raise (about_value or errors)[0]

    return check


_FLAG_KINDS = {"float": "float", "int": "int", "str": "str", "bool": "bool"}


def _flag_kind(annotation: Any) -> str:
    """The flag type of an annotation, ignoring "| None" ("int | None": "int").

    Tuples are "list" flags; anything else (`p`: a number or "inf") is "str".
    """
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    base = [part.strip() for part in text.split("|") if part.strip() != "None"]
    if len(base) != 1:
        return "str"
    if base[0].startswith("tuple"):
        return "list"
    return _FLAG_KINDS.get(base[0], "str")


def regularizer_fields() -> tuple[Field, ...]:
    """The fields of `kgr.GradientRegularizer`'s arguments, derived from it.

    Name, default and help come from its signature and docstring, and its own
    constructor validates each value, so an argument added to it becomes a
    flag without edits here. The flag's type comes from the annotation:
    float, int, str and bool as such, with "| None" a flag that also takes
    "none" (the default None: the method's default), a tuple a list flag
    (`clip`: low,high), anything else (`p`: a number or "inf") a string.
    """
    docs = _argument_docs(GradientRegularizer.__doc__)
    fields = []
    for parameter in inspect.signature(GradientRegularizer).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        kind = _flag_kind(parameter.annotation)
        fields.append(
            Field(
                parameter.name,
                "regularization",
                parameter.default,
                docs.get(parameter.name, f"GradientRegularizer's `{parameter.name}`."),
                _regularizer_check(parameter.name, kind),
                kind=kind,
            )
        )
    return tuple(fields)


_RATE = _checks.check_rate
_NORM = _checks.check_nonnegative  # 0: no constraint.

FIELDS: tuple[Field, ...] = (
    # Data.
    Field("dataset", "data", "mnist", f"Dataset, one of {DATASETS}.", _one_of(DATASETS)),
    Field(
        "tfds_data_dir",
        "data",
        None,
        "tensorflow-datasets data directory (default: TFDS's own).",
        _optional_path(False),
    ),
    Field(
        "data_npz",
        "data",
        None,
        "Offline .npz file with x_train, y_train, x_test, y_test (uint8 images, "
        "integer labels), used instead of tensorflow-datasets.",
        _optional_path(True),
    ),
    Field(
        "validation_split",
        "data",
        0.0,
        "Fraction of the training set held out (its last examples) for validation; "
        "the best checkpoint is then chosen on it.",
        _RATE,
    ),
    # Model.
    Field(
        "model",
        "model",
        "maxout_mlp",
        f"Network of kgr.networks, one of {tuple(NETWORKS)}.",
        _one_of(tuple(NETWORKS)),
    ),
    Field("input_dropout", "model", 0.2, "Dropout rate on the input (0: none).", _RATE),
    Field("hidden_dropout", "model", 0.5, "Dropout rate on later layers' inputs.", _RATE),
    Field(
        "max_norm",
        "model",
        1.9365,
        "Max norm of each unit's incoming weights (dense layers and later "
        "convolutions); 0 for none.",
        _NORM,
    ),
    Field(
        "first_conv_max_norm",
        "model",
        0.9,
        "Max norm of the first convolution's filters; 0 for none.",
        _NORM,
    ),
    Field(
        "hidden_units",
        "model",
        (),
        "MLP hidden layer widths, e.g. 240,240 (empty: the network's default).",
        _int_list,
    ),
    Field(
        "conv_channels",
        "model",
        (),
        "CNN convolution widths, e.g. 16,32 (empty: the network's default, 32,64).",
        _int_list,
    ),
    Field(
        "dense_units",
        "model",
        None,
        "CNN dense layer width, e.g. 128 (default: the network's, 1024).",
        _optional(_checks.check_count),
        kind="int",
    ),
    Field(
        "activation",
        "model",
        None,
        f"CNN activation, one of {ACTIVATIONS} (or another Keras activation name; "
        "default: the network's, relu).",
        _activation,
        kind="str",
    ),
    Field(
        "pieces",
        "model",
        None,
        "Linear pieces per unit of --activation=maxout (default: the network's, 2).",
        _optional(_checks.check_count),
        kind="int",
    ),
    *regularizer_fields(),
    Field(
        "sigma_warmup_epochs",
        "regularization",
        0,
        "Raise sigma linearly over this many epochs (kgr.callbacks.linear_warmup: "
        "sigma * min(1, epoch / N) in epoch 1, 2, ...); 0 for none.",
        _at_least(0),
    ),
    # Optimization.
    Field("optimizer", "optimization", "adam", f"One of {OPTIMIZERS}.", _one_of(OPTIMIZERS)),
    Field(
        "learning_rate",
        "optimization",
        1e-3,
        "Initial learning rate.",
        _checks.check_positive,
    ),
    Field(
        "lr_schedule",
        "optimization",
        "constant",
        f"Learning-rate schedule, one of {LR_SCHEDULES}: exponential multiplies the "
        "rate by lr_decay every epoch; cosine decays it to min_learning_rate over "
        "all epochs.",
        _one_of(LR_SCHEDULES),
    ),
    Field(
        "lr_decay",
        "optimization",
        0.95,
        "Per-epoch factor of the exponential schedule.",
        _checks.check_fraction,
    ),
    Field(
        "min_learning_rate",
        "optimization",
        0.0,
        "Floor of the exponential and cosine schedules.",
        _checks.check_nonnegative,
    ),
    Field("momentum", "optimization", 0.5, "SGD momentum.", _RATE),
    Field("epochs", "optimization", 1, "Number of training epochs.", _checks.check_count),
    Field(
        "batch_size",
        "optimization",
        100,
        "Global batch size (split over replicas).",
        _checks.check_count,
    ),
    Field(
        "steps_per_epoch",
        "optimization",
        0,
        "Training steps per epoch; 0 for one pass over the training set.",
        _at_least(0),
    ),
    # Runtime.
    Field("strategy", "runtime", "one_device", f"One of {STRATEGIES}.", _one_of(STRATEGIES)),
    Field(
        "jit_compile", "runtime", True, "Compile the training step with XLA.", _checks.check_bool
    ),
    Field(
        "mixed_precision",
        "runtime",
        "float32",
        f"Keras dtype policy, one of {PRECISIONS}.",
        _one_of(PRECISIONS),
    ),
    Field("seed", "runtime", 0, "Random seed.", _at_least(0)),
    Field(
        "deterministic",
        "runtime",
        False,
        "Use deterministic TensorFlow ops (slower).",
        _checks.check_bool,
    ),
    # Evaluation.
    Field(
        "eval_suite",
        "evaluation",
        "standard",
        "Attacks of the robustness report after training: standard (AutoAttack's standard "
        "version: APGD-CE, APGD-T and FAB-T with 9 targets, Square; up to 1000 APGD steps, "
        "900 FAB steps and --eval_square_queries queries per robust example and radius), "
        "fast (FGSM and "
        "--eval_pgd_steps PGD steps, each on every example) or none.",
        _one_of(EVAL_SUITES),
    ),
    Field(
        "eval_epsilons_inf",
        "evaluation",
        (0.1, 0.2, 0.3),
        "L-inf radii of the robustness report, in [0, 1] pixel units.",
        _radii,
    ),
    Field(
        "eval_epsilons_2",
        "evaluation",
        (1.0, 2.0),
        "L2 radii of the robustness report, in [0, 1] pixel units.",
        _radii,
    ),
    Field(
        "eval_examples",
        "evaluation",
        1000,
        "Test examples attacked for the robustness report (0: no report).",
        _at_least(0),
    ),
    Field(
        "eval_pgd_steps",
        "evaluation",
        40,
        "PGD steps of the fast suite.",
        _checks.check_count,
    ),
    Field(
        "eval_apgd_steps",
        "evaluation",
        100,
        "Steps of each APGD and FAB-T run of the standard suite (AutoAttack: 100).",
        _checks.check_count,
    ),
    Field(
        "eval_square_queries",
        "evaluation",
        5000,
        "Queries of the Square attack of the standard suite (AutoAttack: 5000).",
        _checks.check_count,
    ),
    Field(
        "pictures",
        "evaluation",
        True,
        "Draw the worst-case perturbations r* of some test examples (PNG).",
        _checks.check_bool,
    ),
)

FIELDS_BY_NAME = {field.name: field for field in FIELDS}
REGULARIZER_FIELDS = tuple(field.name for field in regularizer_fields())


def _mnist(model: str, **overrides: Any) -> dict[str, Any]:
    return {"dataset": "mnist", "model": model, **overrides}


# The paper's experiments (docs/method.md, section 3). Where the paper's value
# is not known, the value here is this project's choice ("chosen"); the
# optimiser (Adam with cosine decay over the run) was chosen by one-epoch
# runs recorded in results/README.md.
_OPTIMIZATION = {"optimizer": "adam", "lr_schedule": "cosine", "learning_rate": 1e-3}

PRESETS: dict[str, dict[str, Any]] = {
    # p=2 (paper); hidden layers, sigma and epochs chosen.
    "mnist_sigmoid_mlp": _mnist(
        "sigmoid_mlp", p=2.0, sigma=0.1, batch_size=100, epochs=50, **_OPTIMIZATION
    ),
    # 784-240x5-240x5-10, dropout 0.2/0.5, max-norm 1.9365, batch 100 (maxout
    # paper), p=2 (paper); sigma, learning rate and epochs chosen.
    "mnist_maxout_mlp": _mnist(
        "maxout_mlp",
        p=2.0,
        sigma=0.1,
        batch_size=100,
        epochs=50,
        **{**_OPTIMIZATION, "learning_rate": 2e-3},
    ),
    # p=inf, sigma=0.1 (paper); batch 128 (maxout paper).
    "mnist_conv_maxout": _mnist(
        "conv_maxout_mnist", p=math.inf, sigma=0.1, batch_size=128, epochs=50, **_OPTIMIZATION
    ),
    # Not the paper's: the field's standard MNIST CNN (Madry et al. 2018; no
    # dropout, no max-norm) at the field's threat model, L-inf 0.3; the
    # method (the penalty by default), batch and epochs chosen. Narrower:
    # --conv_channels=16,32 --dense_units=128. With XLA (the default): since
    # fit chooses its objective outside XLA, a PGD-10 step of the 16/32/128
    # network took 181 ms with XLA and 376 ms without (batch 100, idle 2-core
    # CPU); the pooling is exact under XLA.
    "mnist_cnn": _mnist(
        "cnn",
        activation="relu",
        input_dropout=0.0,
        hidden_dropout=0.0,
        max_norm=0.0,
        p=math.inf,
        sigma=0.3,
        batch_size=100,
        epochs=50,
        **_OPTIMIZATION,
    ),
    # Batch 128 (maxout paper); p and sigma chosen (2/255 in pixel units);
    # GCN + ZCA whitening inside the model, so attacks are in pixel space.
    "cifar10_conv_maxout": {
        "dataset": "cifar10",
        "model": "conv_maxout_cifar10",
        "p": math.inf,
        "sigma": 2.0 / 255.0,
        "batch_size": 128,
        "epochs": 100,
        "eval_epsilons_inf": (2.0 / 255.0, 4.0 / 255.0, 8.0 / 255.0),
        "eval_epsilons_2": (0.25, 0.5),
        **_OPTIMIZATION,
    },
}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"  # inf as "inf".
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def preset_summary(name: str) -> str:
    """The settings a preset changes, as `name: key=value, ...`."""
    values = ", ".join(f"{k}={_format_value(v)}" for k, v in PRESETS[name].items())
    return f"{name}: {values}"


def _post_init(self) -> None:
    if self.preset is not None and self.preset not in PRESETS:
        _checks.check_choice(self.preset, "preset", PRESETS)
    for field in FIELDS:
        object.__setattr__(self, field.name, field.check(getattr(self, field.name), field.name))
    self.regularizer()  # Checks the regularizer's arguments together.
    _check_model_fields(self)
    if (
        self.eval_examples
        and self.eval_suite != "none"
        and not (self.eval_epsilons_inf or self.eval_epsilons_2)
    ):
        raise ValueError(
            "`eval_suite` needs radii in `eval_epsilons_inf` or `eval_epsilons_2` "
            "(or eval_suite=none). Received: eval_epsilons_inf=(), eval_epsilons_2=()"
        )
    if self.min_learning_rate > self.learning_rate:
        raise ValueError(
            "`min_learning_rate` must not exceed `learning_rate`. Received: "
            f"min_learning_rate={self.min_learning_rate!r}, "
            f"learning_rate={self.learning_rate!r}"
        )


MODEL_FIELDS = tuple(f.name for f in FIELDS if f.group == "model" and f.name != "model")


def _check_model_fields(config) -> None:
    """Model settings the network's builder does not take must keep their defaults."""
    taken = inspect.signature(NETWORKS[config.model]).parameters
    for name in MODEL_FIELDS:
        value = getattr(config, name)
        if name not in taken and value != FIELDS_BY_NAME[name].default:
            raise ValueError(
                f"`{name}` does not apply to model={config.model!r} (its builder takes no "
                f"`{name}`). Received: {name}={value!r}"
            )
    activation = config.activation or taken.get("activation", inspect.Parameter).default
    if config.pieces is not None and activation != "maxout":
        raise ValueError(
            "`pieces` applies to activation='maxout' only. "
            f"Received: pieces={config.pieces!r}, activation={activation!r}"
        )


def comparable_settings(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a config's `to_dict()` or a recorded one) with the regularizer's resolved.

    The regularization settings are replaced by what `kgr.GradientRegularizer`
    makes of them (its `get_config()`; None for an argument the method does
    not take), so that two records of one run compare equal: e.g.
    `clean_weight` recorded as 0.0 before its default became None (the
    method's default, 0.0). Settings that do not make a regularizer are kept
    as they are.
    """
    arguments = {name: values[name] for name in REGULARIZER_FIELDS if name in values}
    try:
        resolved = GradientRegularizer(**arguments).get_config()
    except (TypeError, ValueError):
        return dict(values)
    return {
        key: resolved.get(key) if key in REGULARIZER_FIELDS else value
        for key, value in values.items()
    }


def _regularizer(self) -> GradientRegularizer:
    """The run's `kgr.GradientRegularizer` (its arguments are config fields)."""
    return GradientRegularizer(**{name: getattr(self, name) for name in REGULARIZER_FIELDS})


def _replace(self, **changes: Any):
    """A copy with `changes` applied (and validated)."""
    return dataclasses.replace(self, **changes)


def _to_dict(self) -> dict[str, Any]:
    """JSON-ready values (p = inf as "inf", tuples as lists)."""
    values = {k: _checks.inf_as_text(v) for k, v in dataclasses.asdict(self).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# All settings of one training run, validated on construction: `preset` (the
# preset the values started from, or None), then one attribute per field of
# `FIELDS` (meanings, defaults and checks there, and in `--helpfull`).
Config = dataclasses.make_dataclass(
    "Config",
    [("preset", "str | None", dataclasses.field(default=None))]
    + [(f.name, Any, dataclasses.field(default=f.default)) for f in FIELDS],
    namespace={
        "__post_init__": _post_init,
        "__doc__": "All settings of one training run; validated on construction.",
        "regularizer": _regularizer,
        "replace": _replace,
        "to_dict": _to_dict,
    },
    frozen=True,
)
Config.__module__ = __name__


def make_config(preset: str | None = None, **overrides: Any) -> Config:
    """The config of `preset` (or the defaults) with `overrides` applied.

    Args:
        preset: A name from `PRESETS`, or None for the defaults.
        **overrides: Field values that replace the preset's.

    Returns:
        The validated `Config`.

    Raises:
        ValueError: On an unknown preset or field, or an invalid value.
    """
    if preset is not None and preset not in PRESETS:
        _checks.check_choice(preset, "preset", PRESETS)
    unknown = sorted(set(overrides) - set(FIELDS_BY_NAME))
    if unknown:
        raise ValueError(f"Unknown config fields {unknown}. Known: {sorted(FIELDS_BY_NAME)}")
    values = {**(PRESETS[preset] if preset else {}), **overrides}
    return Config(preset=preset, **values)
