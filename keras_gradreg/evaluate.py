"""`python -m keras_gradreg.evaluate` (`kgr-evaluate`): the suite on any saved Keras classifier.

    kgr-evaluate --model=model.keras --npz=mnist.npz --examples=1000 --output_dir=eval

loads the model (a `.keras` file, or a SavedModel directory written by
`model.export()`), the test split of the data (an `.npz`, or a
tensorflow-datasets name with `--tfds`), runs `kgr.evaluate_robustness`, prints
the report's table and flags, and writes robustness.json and robustness.png
into `--output_dir`. Options: docs/evaluate.md, or `--help`.

Bad input (a file that is not a model, labels out of range, shapes that do
not match) stops the command with one line naming the flag, before any
attack runs; the outputs are written under temporary names and renamed at the
end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg.robustness import data as data_lib
from keras_gradreg.robustness.evaluate import DEFAULT_EPSILONS, evaluate_robustness
from keras_gradreg.robustness.runner import ATTACKS, SUITES

PROGRAM = "kgr-evaluate"
OUTPUTS = ("robustness.json", "robustness.png")
EXTRA = "train"  # The setup.cfg extra that installs tensorflow-datasets.


class RefusedError(Exception):
    """Bad input, reported as one line naming the flag."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}" if flag else message)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # One line, not the usage block.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _radii(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected radii like 0.1,0.3; got {text!r}") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0; got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _clip(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH or none; got {text!r}") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH; got {text!r}")
    return low, high


def _scale(text: str) -> str | float:
    if text in ("auto", "none"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected auto, none or a number > 0; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's flags."""
    parser = _Parser(
        prog=PROGRAM,
        description="Robust accuracy of a saved Keras classifier under an attack suite "
        "(AutoAttack's standard version by default), with checks on the evaluation.",
    )
    add = parser.add_argument
    add("--model", required=True, help="a .keras file, or a SavedModel directory from export()")
    add("--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import this module first (one that registers custom layers); repeatable")  # fmt: skip
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--npz", help="an .npz file holding x_SPLIT and y_SPLIT arrays")
    source.add_argument("--tfds", help="a tensorflow-datasets name (e.g. mnist)")
    add("--split", default="test", help="the split: test reads x_test/y_test (default: test)")
    add("--x_key", help="the .npz key of the inputs (default: x_SPLIT)")
    add("--y_key", help="the .npz key of the labels (default: y_SPLIT)")
    add("--examples", type=_positive, help="evaluate the first N examples (default: all)")
    add("--scale", type=_scale, default="auto",
        help="divide inputs by this; auto: uint8 inputs by 255, others as they are")  # fmt: skip
    add("--clip", type=_clip, default=(0.0, 1.0), help="the box of valid inputs LOW,HIGH or none")
    linf, l2 = (",".join(f"{e:g}" for e in DEFAULT_EPSILONS[p]) for p in (math.inf, 2.0))
    add("--linf", type=_radii, help=f"L-inf radii (default {linf} if no radius flag is set)")
    add("--l2", type=_radii, help=f"L2 radii (default {l2} if no radius flag is set)")
    add("--l1", type=_radii, help="L1 radii (FGSM and PGD only)")
    add("--suite", choices=tuple(SUITES), default="standard", help="the attack suite")
    add("--attacks", help=f"comma-separated attacks instead of the suite, from {','.join(ATTACKS)}")
    add("--from_logits", choices=("auto", "true", "false"), default="auto",
        help="whether outputs are logits; auto: probabilities if every row is non-negative "
        "and sums to 1")  # fmt: skip
    add("--batch_size", type=_positive, default=500, help="examples per attack call")
    add("--seed", type=int, default=0, help="seed of every random start")
    for name, what in (
        ("steps", "PGD steps"), ("apgd_steps", "APGD steps"), ("fab_steps", "FAB-T steps"),
        ("square_queries", "Square queries"),
    ):  # fmt: skip
        add(f"--{name}", type=_positive, help=f"{what} (default: the library's)")
    add("--sanity_examples", type=int, default=100,
        help="examples APGD-CE attacks at the box diameter, to check accuracy falls to 0 "
        "there (0 skips the check)")  # fmt: skip
    add("--output_dir", required=True, help="where robustness.json and robustness.png go")
    add("--verbose", choices=("auto", "0", "1", "2"), default="auto",
        help="1 a progress bar per attack, 2 a line per attack, 0 none; auto: 1 on a tty",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (0, or 2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except RefusedError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Loads, evaluates, prints and writes; raises `RefusedError` on bad input."""
    _check_output_dir(args.output_dir)
    for name in args.imports:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 (any failure of the user's module)
            raise RefusedError("--import", f"could not import {name!r}: {_line(error)}") from error
    epsilons = _epsilons(args)
    model, kind = load_model(args.model)
    x, y, data_flag = load_data(args)
    x, reshaped = fit_input_shape(model, x)
    print(f"model: {args.model} ({kind}); data: {data_flag}, {len(x)} examples, "
          f"inputs {x.dtype} from {x.min():g} to {x.max():g}"
          + (f", reshaped from {reshaped[0]} to {reshaped[1]}" if reshaped else ""))  # fmt: skip
    loss = _loss(model, x, y, args.from_logits, data_flag)
    if kind == "SavedModel":
        _check_gradients(model, x[:1])
    budgets = {k: getattr(args, k) for k in ("steps", "apgd_steps", "fab_steps", "square_queries")}
    verbose = (1 if sys.stdout.isatty() else 2) if args.verbose == "auto" else int(args.verbose)
    try:
        report = evaluate_robustness(
            model, (x, y), epsilons, _attacks(args), suite=args.suite, loss=loss,
            clip=args.clip, batch_size=args.batch_size, seed=args.seed, verbose=verbose,
            sanity_examples=args.sanity_examples,
            **{k: v for k, v in budgets.items() if v is not None},
        )  # fmt: skip
    except data_lib.DataError as error:
        raise RefusedError(data_flag, _data_message(error)) from error
    except ValueError as error:
        raise RefusedError("", _line(error)) from error
    report.settings["command"] = {
        "model": args.model,
        "model_kind": kind,
        "data": data_flag,
        "examples": len(x),
        "scale": args.scale,
        "reshaped": reshaped,
        "from_logits": args.from_logits,
    }
    print(_detection_line(report.settings, args.from_logits))
    print(report)
    written = write_outputs(report, args.output_dir)
    print("wrote " + ", ".join(written))


# ---------------------------------------------------------------------- #
# Model and data.
# ---------------------------------------------------------------------- #


def load_model(path: str) -> tuple[keras.Model, str]:
    """A `.keras` (or `.h5`) model without its compiled loss, or a SavedModel wrapped in a layer.

    A SavedModel from `model.export()` is called through `keras.layers.TFSMLayer`
    (its "serve" endpoint), which TensorFlow differentiates like any function.
    """
    if not os.path.exists(path):
        raise RefusedError("--model", f"no such file or directory. Received: --model={path}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise RefusedError(
                "--model", f"a directory without saved_model.pb is not a SavedModel. "
                f"Received: --model={path}",
            )  # fmt: skip
        return _saved_model(path), "SavedModel"
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 (whatever the file is, one line)
        hint = ""
        if "custom" in str(error).lower() or "locate" in str(error).lower():
            hint = "; if it uses custom layers, --import the module that registers them"
        raise RefusedError(
            "--model", f"not a Keras model file ({_line(error)}){hint}. Received: --model={path}"
        ) from error
    if not isinstance(model, keras.Model):
        raise RefusedError("--model", f"not a Keras model. Received: --model={path}")
    return model, "Keras"


def _saved_model(path: str) -> keras.Model:
    try:
        layer = keras.layers.TFSMLayer(path, call_endpoint="serve")
    except Exception as error:  # noqa: BLE001
        raise RefusedError(
            "--model", "a SavedModel without the \"serve\" endpoint that model.export() "
            f"writes ({_line(error)}). Received: --model={path}",
        ) from error  # fmt: skip
    signature = getattr(layer.call_endpoint_fn, "input_signature", None)
    specs = tf.nest.flatten(signature) if signature is not None else []
    if len(specs) != 1 or not isinstance(specs[0], tf.TensorSpec):
        raise RefusedError(
            "--model", f"the command evaluates models with one input tensor; this SavedModel's "
            f"endpoint takes {signature!r}. Received: --model={path}",
        )  # fmt: skip
    inputs = keras.Input(tuple(specs[0].shape)[1:], dtype=specs[0].dtype.name)
    outputs = layer(inputs)
    if isinstance(outputs, dict) and len(outputs) == 1:
        outputs = next(iter(outputs.values()))
    if isinstance(outputs, (dict, list, tuple)):
        raise RefusedError(
            "--model", f"the SavedModel has several outputs; the command needs one (class "
            f"scores). Received: --model={path}",
        )  # fmt: skip
    return keras.Model(inputs, outputs)


def _check_gradients(model: keras.Model, x: np.ndarray) -> None:
    """Refuses a model whose outputs give no gradient with respect to its inputs."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(tf.cast(model(x, training=False), tf.float32))
    if tape.gradient(total, x) is None:
        raise RefusedError(
            "--model", "TensorFlow finds no gradient of the outputs with respect to the "
            "inputs through this SavedModel; gradient attacks cannot run on it",
        )  # fmt: skip


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(x scaled, y, the flag the data came from as shown to the user)."""
    if args.npz is not None:
        flag = f"--npz={args.npz}"
        x, y = _npz(args.npz, args.x_key or f"x_{args.split}", args.y_key or f"y_{args.split}")
    else:
        flag = f"--tfds={args.tfds} --split={args.split}"
        x, y = _tfds(args.tfds, args.split, args.examples)
    if args.examples is not None:
        x, y = x[: args.examples], y[: args.examples]
    if len(x) != len(y):
        raise RefusedError(flag, f"{len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(x.dtype, np.number):
        raise RefusedError(flag, f"the inputs must be numbers. Received: dtype {x.dtype}")
    if args.scale == "auto":
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    elif args.scale == "none":
        x = x.astype(np.float32)
    else:
        x = x.astype(np.float32) / np.float32(args.scale)
    return x, y, flag


def fit_input_shape(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, list | None]:
    """`x` reshaped to the model's input shape when only the layout differs.

    MNIST's (n, 28, 28) for a model taking (28, 28, 1) or (784,): the same
    values per example, in row-major order. Returns the inputs and
    [shape before, shape after] per example, or None if left as they were.
    """
    try:
        expected = tuple(model.inputs[0].shape)[1:] if len(model.inputs) == 1 else None
    except (AttributeError, ValueError, TypeError):
        expected = None
    if not expected or None in expected or expected == x.shape[1:]:
        return x, None
    if math.prod(expected) != math.prod(x.shape[1:]):
        return x, None  # Refused later, naming the shapes.
    return x.reshape((len(x), *expected)), [list(x.shape[1:]), list(expected)]


def _npz(path: str, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in (x_key, y_key) if key not in arrays.files]
            if missing:
                raise RefusedError(
                    "--npz", f"no array {missing[0]!r} in {path} (it holds {arrays.files}); "
                    "choose --split, or --x_key and --y_key",
                )  # fmt: skip
            return arrays[x_key], arrays[y_key]
    except (OSError, ValueError) as error:
        raise RefusedError("--npz", f"cannot read {path} as .npz: {_line(error)}") from error


def _tfds(name: str, split: str, examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise RefusedError(
            "--tfds", "needs tensorflow-datasets, which the library does not install: "
            f"pip install \"keras_gradreg[{EXTRA}]\" (or tensorflow-datasets); or use --npz",
        ) from error  # fmt: skip
    chosen = split if examples is None else f"{split}[:{examples}]"
    try:
        dataset = tfds.load(name, split=chosen, as_supervised=True)
        if examples is not None:
            dataset = dataset.take(examples)
        batches = list(tfds.as_numpy(dataset.batch(1024)))
    except Exception as error:  # noqa: BLE001 (unknown name, split, download failure)
        raise RefusedError(
            "--tfds", f"cannot load {name!r} split {chosen!r}: {_line(error)}"
        ) from error
    if not batches:
        raise RefusedError("--tfds", f"{name!r} split {chosen!r} holds no examples")
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _loss(model, x, y, from_logits: str, data_flag: str):
    """None (`evaluate_robustness` detects from_logits), or cross-entropy as --from_logits says."""
    try:
        data_lib.check_input_shape(model, x)
        first = data_lib.model_outputs(model, x[:1], 1)
    except data_lib.DataError as error:
        raise RefusedError(data_flag, _data_message(error)) from error
    if from_logits == "auto":
        return None
    return data_lib.cross_entropy(y, first, from_logits=from_logits == "true")


def _detection_line(settings: dict[str, Any], flag: str) -> str:
    outputs, logits = settings["outputs"], settings["loss_from_logits"]
    if flag == "auto":
        return f"outputs look like {outputs}: cross-entropy with from_logits={logits} (detected)"
    return (
        f"cross-entropy with from_logits={logits} (--from_logits={flag}); "
        f"the outputs look like {outputs}"
    )


# ---------------------------------------------------------------------- #
# Flags to arguments, and the outputs.
# ---------------------------------------------------------------------- #


def _epsilons(args: argparse.Namespace) -> dict[float, list[float]]:
    given = {p: v for p, v in ((math.inf, args.linf), (2.0, args.l2), (1.0, args.l1)) if v}
    if 1.0 in given and not set(_attacks(args) or SUITES[args.suite]) <= {"fgsm", "pgd"}:
        raise RefusedError(
            "--l1", "only FGSM and PGD attack p=1: add --suite=fast or --attacks=fgsm,pgd"
        )
    return given or {p: list(v) for p, v in DEFAULT_EPSILONS.items()}


def _attacks(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.attacks is None:
        return None
    names = tuple(name.strip() for name in args.attacks.split(",") if name.strip())
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise RefusedError(
            "--attacks", f"choose from {','.join(ATTACKS)}. Received: --attacks={args.attacks}"
        )
    return names


def _check_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise RefusedError("--output_dir", f"exists and is not a directory. Received: {path}")


def write_outputs(report, output_dir: str) -> list[str]:
    """Writes robustness.json and robustness.png under temporary names, then renames both."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    temporary = []
    try:
        for name in OUTPUTS:
            stem, suffix = os.path.splitext(name)
            handle, path = tempfile.mkstemp(suffix=suffix, prefix=f".{stem}-", dir=output_dir)
            os.close(handle)
            temporary.append(path)
        report.save_json(temporary[0])
        report.plot(temporary[1])
        final = [os.path.join(output_dir, name) for name in OUTPUTS]
        umask = os.umask(0)
        os.umask(umask)
        for source, target in zip(temporary, final):
            os.chmod(source, 0o666 & ~umask)  # mkstemp made it private.
            os.replace(source, target)
        return final
    except BaseException:
        for path in temporary:
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise


def _data_message(error: data_lib.DataError) -> str:
    """The library's message in the command's terms."""
    text = _line(error).replace("`data`'s ", "").replace("`data` ", "the data ")
    return text + (" (see --scale and --clip)" if "`clip`" in text else "")


def _line(error: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())
