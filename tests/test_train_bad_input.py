"""Bad input to the training binary: one line naming the flag, exit 2, nothing left behind.

Each case runs `train.main` in this process (the same code path as the
command line, without TensorFlow's start-up per case); one case runs the real
command to check what a user sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import config as config_lib
from train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(n_train=40, n_test=10, shape=(28, 28)):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, *shape)).astype("uint8"),
        "y_train": rng.integers(0, 10, size=n_train).astype("uint8"),
        "x_test": rng.integers(0, 256, size=(n_test, *shape)).astype("uint8"),
        "y_test": rng.integers(0, 10, size=n_test).astype("uint8"),
    }


def _npz(directory, name, **replace):
    arrays = {**_arrays(), **replace}
    path = os.path.join(directory, name)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _truncated(directory):
    good = _npz(directory, "good.npz")
    path = os.path.join(directory, "truncated.npz")
    with open(good, "rb") as f, open(path, "wb") as out:
        out.write(f.read()[:1000])
    return path


def _text(directory):
    path = os.path.join(directory, "text.npz")
    with open(path, "w") as f:
        f.write("x_train,y_train\n1,2\n")
    return path


def _npy(directory):
    path = os.path.join(directory, "array.npz")
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 28, 28), "uint8"))
    return path


def _objects(directory):
    return _npz(directory, "objects.npz", y_train=np.array([{"label": 1}] * 40, dtype=object))


# (case, data_npz maker, extra flags, message fragment). The message also names the flag.
DATA_CASES = [
    ("truncated file", _truncated, [], "cannot read the file as an .npz archive (File is not a"),
    ("not a numpy file", _text, [], "cannot read the file as an .npz archive (not a NumPy file)"),
    ("a single .npy", _npy, [], "a single .npy array, not an .npz archive"),
    ("object arrays", _objects, [], "cannot read the array `y_train` (it holds Python objects)"),
    ("missing key", lambda d: _npz(d, "m.npz", y_test=None), [], "missing ['y_test']"),
    (
        "float images",
        lambda d: _npz(d, "f.npz", x_train=np.zeros((40, 28, 28), "float32")),
        [],
        "x_train.dtype=float32",
    ),
    (
        "flat images",
        lambda d: _npz(d, "s.npz", x_train=np.zeros((40, 784), "uint8")),
        [],
        "x_train.shape=(40, 784)",
    ),
    (
        "no test images",
        lambda d: _npz(d, "e.npz", x_test=np.zeros((0, 28, 28), "uint8"), y_test=np.zeros(0)),
        [],
        "`x_test` holds no images",
    ),
    (
        "labels out of range",
        lambda d: _npz(d, "r.npz", y_train=np.full(40, 10)),
        [],
        "`y_train` must be in [0, 10)",
    ),
    (
        "too few labels",
        lambda d: _npz(d, "c.npz", y_test=np.zeros(9, "int64")),
        [],
        "`y_test` must hold 10 integer labels",
    ),
    (
        "float labels",
        lambda d: _npz(d, "l.npz", y_train=np.zeros(40, "float32")),
        [],
        "dtype=float32",
    ),
    (
        "train and test shapes differ",
        lambda d: _npz(d, "t.npz", x_test=np.zeros((10, 27, 27), "uint8")),
        [],
        "train and test images differ in shape",
    ),
    (
        "shape of another dataset",
        lambda d: _npz(d, "cifar.npz", **_arrays(shape=(32, 32, 3))),
        [],
        "holds images of shape (32, 32, 3), but --dataset=mnist",
    ),
    (
        "batch larger than the data",
        lambda d: _npz(d, "small.npz"),
        ["--batch_size=64"],
        "--batch_size=64 exceeds the 40 training examples",
    ),
    (
        "validation split leaves nothing",
        lambda d: _npz(d, "v.npz"),
        ["--validation_split=0.99"],
        "--validation_split=0.99 leaves no training",
    ),
]


def run_main(*args):
    """Runs train.main as the command line does; returns (exit status, stderr lines)."""
    code = 0
    try:
        argv = main.parse_flags(["train.main", *args])
        main.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        main.FLAGS.unparse_flags()
    return code


def _assert_one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == main.USAGE_ERROR, err
    assert len(lines) == 1 and lines[0].startswith("train.main: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case, make, flags, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, capsys, case, make, flags, message):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = make(str(data_dir))
    workdir = tmp_path / "new" / "run"
    code = run_main(
        "--preset=mnist_maxout_mlp", f"--data_npz={path}", f"--workdir={workdir}", *flags
    )
    flag = flags[0].split("=")[0] if flags else f"--data_npz={path}"
    _assert_one_line_error(capsys, code, message, flag)
    assert not (tmp_path / "new").exists()


def _previous_run(workdir, data=None, **settings):
    workdir.mkdir(parents=True)
    flags = config_lib.make_config("mnist_maxout_mlp", batch_size=8, **settings).to_dict()
    content = {"flags": flags, "status": "training", "data": data}
    (workdir / "metrics.json").write_text(json.dumps(content))


WORKDIR_CASES = [
    (
        "a file",
        lambda t: (t / "file").write_text("x") and t / "file",
        "exists and is not a directory",
    ),
    (
        "under a file",
        lambda t: (t / "file").write_text("x") and t / "file" / "sub" / "run",
        "cannot be created: ",
    ),
    ("a name too long", lambda t: t / "new" / ("x" * 300), "a name is longer than 255"),
    # /proc refuses new directories even to root: creation fails after the checks.
    (
        "parent cannot be created",
        lambda t: Path("/proc/kgr_no_such_dir/run"),
        "cannot be created (",
    ),
    (
        "another run's settings",
        lambda t: _previous_run(t / "old", sigma=0.3) or t / "old",
        "holds a run with other settings (sigma: 0.3 -> 0.1)",
    ),
    (
        "other data",
        lambda t: _previous_run(t / "old", data={"source": "npz", "sha256": "ab12"}) or t / "old",
        "is not the data the run in --workdir=",
    ),
    (
        "other data, checksums named",
        lambda t: _previous_run(t / "old", data={"source": "npz", "sha256": "ab12"}) or t / "old",
        "(sha256 ab12 there, ",
    ),
    (
        "unreadable metrics.json",
        lambda t: (t / "bad").mkdir() or (t / "bad" / "metrics.json").write_text("{") and t / "bad",
        "holds an unreadable metrics.json",
    ),
]


@pytest.mark.parametrize("case, make, message", WORKDIR_CASES, ids=[c[0] for c in WORKDIR_CASES])
def test_bad_workdir(tmp_path, capsys, case, make, message):
    data = _npz(str(tmp_path), "good.npz")
    workdir = make(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = run_main(
        "--preset=mnist_maxout_mlp", f"--data_npz={data}", f"--workdir={workdir}", "--batch_size=8"
    )
    _assert_one_line_error(capsys, code, message, f"--workdir={workdir}")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # Nothing created or changed.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sigma=-1"], "flag --sigma=-1.0: `sigma` must be a finite number >= 0"),
        (["--data_npz=/no/such.npz"], "flag --data_npz=/no/such.npz: `data_npz` must be an"),
        (["--preset=mnist_conv_maxout", "--hidden_units=10"], "hidden_units=(10,)"),
        (["--sigmaa=1"], "Unknown command line flag 'sigmaa'"),
        (["--clip=1,0"], "flag --clip=['1', '0']: `clip` must be a pair (low, high) with low < h"),
        (["--beta=3"], "`beta` does not apply to method='penalty' (it is an argument of 'trades')"),
        (["--method=trades", "--clean_weight=0.5"], "`clean_weight` does not apply to method="),
        (["--preset=mnist_cnn", "--pieces=3"], "`pieces` applies to activation='maxout' only"),
        (["--preset=mnist_cnn", "--hidden_units=10"], "`hidden_units` does not apply to model="),
        (["--activation=swirl"], "flag --activation=swirl: `activation` must be one of"),
        (["--sigma_warmup_epochs=-1"], "flag --sigma_warmup_epochs=-1: `sigma_warmup_epochs` must"),
        (["extra"], "unexpected arguments ['extra']"),
    ],
)
def test_bad_flags(tmp_path, capsys, flags, message):
    code = run_main(f"--workdir={tmp_path / 'run'}", *flags)
    _assert_one_line_error(capsys, code, message)
    assert not (tmp_path / "run").exists()


def test_missing_workdir_is_a_usage_error(capsys):
    _assert_one_line_error(capsys, run_main("--sigma=0.2"), "--workdir is required")


@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_2(tmp_path):
    path = _truncated(str(tmp_path))
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.main", f"--data_npz={path}", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.main:")]
    assert errors == [
        f"train.main: error: --data_npz={path}: cannot read the file as an .npz archive "
        "(File is not a zip file)."
    ]
    assert not workdir.exists()


def test_a_workdir_in_use_by_another_run_is_refused(tmp_path, capsys):
    """Two runs in one workdir would overwrite each other: the second stops at once."""
    from train import workdir as workdir_lib

    data = _npz(str(tmp_path), "good.npz")
    workdir = tmp_path / "busy"
    workdir.mkdir()
    with workdir_lib.locked(str(workdir)):
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        code = run_main(
            "--preset=mnist_maxout_mlp", f"--data_npz={data}", f"--workdir={workdir}",
            "--batch_size=8",
        )  # fmt: skip
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    _assert_one_line_error(capsys, code, "is in use by another run", f"--workdir={workdir}")


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """metrics.json written before `every`/`fraction` existed: equal to the defaults, not other."""
    from train import workdir as workdir_lib

    _previous_run(tmp_path / "old")
    record = json.loads((tmp_path / "old" / "metrics.json").read_text())
    for name in ("every", "fraction"):
        del record["flags"][name]
    config = config_lib.make_config("mnist_maxout_mlp", batch_size=8)
    workdir_lib.check_same_run(record, config, "old")  # every=1, fraction=1.0: the same run.
    with pytest.raises(Exception, match=r"other settings \(every: 1 -> 4\)"):
        workdir_lib.check_same_run(
            record, config_lib.make_config("mnist_maxout_mlp", batch_size=8, every=4), "old"
        )


def test_a_run_recorded_before_the_none_defaults_resumes(tmp_path):
    """clean_weight 0.0 and fd_step 0.01 recorded (the old defaults), no ascent settings."""
    from train import workdir as workdir_lib

    _previous_run(tmp_path / "old")
    record = json.loads((tmp_path / "old" / "metrics.json").read_text())
    record["flags"].update(clean_weight=0.0, fd_step=0.01)
    for name in ("steps", "step_size", "random_start", "clip", "beta", "sigma_warmup_epochs"):
        del record["flags"][name]
    config = config_lib.make_config("mnist_maxout_mlp", batch_size=8)
    assert config.clean_weight is None and config.fd_step is None
    workdir_lib.check_same_run(record, config, "old")  # The same run.
    with pytest.raises(Exception, match=r"other settings \(clean_weight: 0.0 -> 0.5\)"):
        workdir_lib.check_same_run(record, config.replace(clean_weight=0.5), "old")
    with pytest.raises(Exception, match=r"other settings \(sigma_warmup_epochs: 0 -> 2\)"):
        workdir_lib.check_same_run(record, config.replace(sigma_warmup_epochs=2), "old")


def test_a_trades_run_resumes_only_with_its_ascent_settings(tmp_path):
    from train import workdir as workdir_lib

    _previous_run(tmp_path / "t", p="inf", method="trades", steps=5, clip=(0, 1))
    record = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert record["flags"]["clip"] == [0.0, 1.0] and record["flags"]["beta"] is None
    config = config_lib.make_config(
        "mnist_maxout_mlp", batch_size=8, p="inf", method="trades", steps=5, clip=(0.0, 1.0)
    )
    workdir_lib.check_same_run(record, config, "t")
    # beta=6 is what None means for "trades": the same run.
    workdir_lib.check_same_run(record, config.replace(beta=6.0), "t")
    with pytest.raises(Exception, match=r"other settings \(steps: 5 -> 7\)"):
        workdir_lib.check_same_run(record, config.replace(steps=7), "t")
    with pytest.raises(Exception, match=r"clip: \[0.0, 1.0\] -> None"):
        workdir_lib.check_same_run(record, config.replace(clip=None), "t")
