r"""Trains one of the paper's networks with gradient regularisation.

    python -m train.main --preset=mnist_maxout_mlp --workdir=/tmp/run \
        [--data_npz=../shared/data/mnist.npz] [--sigma=0.1 ...]

`--preset` sets one paper experiment's values and flags given explicitly
override them; `--print_config` prints the resolved settings and exits;
`--helpfull` lists every flag by group (data, model, regularization,
optimization, runtime, evaluation). Every value, the data file and the
workdir are checked before any work starts: bad input stops the binary with
one line naming the flag and exit status 2. See `train.train_lib` for what
the run writes.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from train import config as config_lib
from train import field_flags, train_lib
from train.errors import InputError

FLAGS = flags.FLAGS
USAGE_ERROR = 2  # Exit status for bad input, as argparse's.


def _preset_help() -> str:
    presets = "; ".join(config_lib.preset_summary(name) for name in config_lib.PRESETS)
    return (
        "A paper experiment whose settings are the defaults; other flags override them "
        f"(--print_config shows the result). {presets}."
    )


flags.DEFINE_enum("preset", None, list(config_lib.PRESETS), _preset_help())
field_flags.define_once(
    flags.Flag(flags.ArgumentParser(), flags.ArgumentSerializer(), "workdir", None,
               "Directory for checkpoints, metrics and summaries."),
    __name__, key_of=__name__,
)  # fmt: skip
flags.DEFINE_boolean(
    "print_config", False, "Print the resolved configuration (preset and flags) as JSON and exit."
)
flags.DEFINE_boolean(
    "reevaluate",
    False,
    "Evaluate a finished run again (robustness report, pictures); without it a finished "
    "run started again does nothing.",
)
flags.register_multi_flags_validator(
    ["workdir", "print_config"],
    lambda values: bool(values["workdir"]) or values["print_config"],
    message="--workdir is required (unless --print_config).",
)


def _group_module(group: str) -> str:
    """The heading --helpfull lists a group's flags under (headings are sorted by name)."""
    return f"{config_lib.GROUPS.index(group) + 1}. {group} flags of train.main"


for _field in config_lib.FIELDS:  # --help lists them too.
    field_flags.define(_field, _group_module(_field.group), key_of=__name__)


def config_from_flags() -> config_lib.Config:
    """The preset's config with the explicitly given flags applied."""
    overrides = {
        field.name: FLAGS[field.name].value
        for field in config_lib.FIELDS
        if FLAGS[field.name].present
    }
    return config_lib.make_config(FLAGS.preset, **overrides)


def fail(message: str) -> None:
    """Prints one line naming the bad input and exits with `USAGE_ERROR`."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    sys.stderr.write(f"train.main: error: {text}\n")
    sys.exit(USAGE_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a one-line error and exit status 2 on bad flags."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        fail(f"{error} (see --helpfull)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}.")
    try:
        config = config_from_flags()
    except ValueError as error:
        fail(str(error))
    if FLAGS.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return
    try:
        results = train_lib.train_and_evaluate(config, FLAGS.workdir, reevaluate=FLAGS.reevaluate)
    except InputError as error:
        fail(str(error))
    logging.info("Final: %s", json.dumps(results["final"]))
    print(json.dumps({"workdir": FLAGS.workdir, **results["final"]}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
