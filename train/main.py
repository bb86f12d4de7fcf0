r"""Trains one of the paper's networks with gradient regularisation.

    python -m train.main --preset=mnist_maxout_mlp --workdir=/tmp/run \
        [--data_npz=mnist.npz] [--sigma=0.1 ...]

Flags are grouped as in `train.config.FIELDS` (data, model, regularization,
optimization, runtime, evaluation); `--preset` sets one paper experiment's
values and flags given explicitly override them. Every value is checked
before any work starts. See `train.train_lib` for what the run writes.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from train import config as config_lib
from train import train_lib

FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "preset",
    None,
    list(config_lib.PRESETS),
    "A paper experiment whose settings are the defaults; other flags override them.",
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summaries.")
flags.mark_flag_as_required("workdir")


def _define(field: config_lib.Field) -> None:
    help_text = f"[{field.group}] {field.help}"
    default = field.default
    if isinstance(default, bool):
        flags.DEFINE_boolean(field.name, default, help_text)
    elif isinstance(default, tuple):
        flags.DEFINE_list(field.name, [str(v) for v in default], help_text)
    elif field.name == "p":
        flags.DEFINE_string(field.name, str(default), help_text)
    elif isinstance(default, int):
        flags.DEFINE_integer(field.name, default, help_text)
    elif isinstance(default, float):
        flags.DEFINE_float(field.name, default, help_text)
    else:
        flags.DEFINE_string(field.name, default, help_text)

    def checker(value, field=field):
        try:
            field.check(field.name, value)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
        return True

    flags.register_validator(field.name, checker)


for _field in config_lib.FIELDS:
    _define(_field)


def config_from_flags() -> config_lib.Config:
    """The preset's config with the explicitly given flags applied."""
    overrides = {
        field.name: FLAGS[field.name].value
        for field in config_lib.FIELDS
        if FLAGS[field.name].present
    }
    return config_lib.make_config(FLAGS.preset, **overrides)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        config = config_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    results = train_lib.train_and_evaluate(config, FLAGS.workdir)
    logging.info("Final: %s", json.dumps(results["final"]))
    print(json.dumps({"workdir": FLAGS.workdir, **results["final"]}))


if __name__ == "__main__":
    app.run(main)
