"""The standard suite's wall time per attack on a small MNIST model (docs/guide.md, suite cost).

Trains a small ReLU MLP (784-256-256-10) with FGSM adversarial training
(p=inf, sigma 0.1, clean_weight 0.5) for a few epochs on MNIST, then runs
`evaluate_robustness` with the standard suite (APGD-CE, APGD-T, FAB-T,
Square) on the first test images and writes, per radius and attack, the
examples attacked and broken and the seconds taken, with the machine's
load average before and after.

    python bench/suite_cost.py --data=../shared/data/mnist.npz --images=200 \
        --linf 0.1 0.2 0.3 --l2 1.0 --out=bench/results/suite_cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import keras
import numpy as np

import keras_gradreg as kgr


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="mnist.npz with x/y_train and x/y_test")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--linf", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--l2", type=float, nargs="*", default=[1.0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with np.load(args.data) as data:
        x_train = data["x_train"].reshape(-1, 784).astype("float32") / 255.0
        x_test = data["x_test"].reshape(-1, 784).astype("float32") / 255.0
        y_train, y_test = data["y_train"], data["y_test"]
    keras.utils.set_random_seed(0)
    plain = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    regularizer = kgr.GradientRegularizer(
        p=math.inf, sigma=0.1, method="adversarial", clean_weight=0.5
    )
    model = kgr.regularize(plain, regularizer)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs, verbose=2)
    train_seconds = time.perf_counter() - start

    data = (x_test[: args.images], y_test[: args.images])
    points = [(math.inf, e) for e in args.linf] + [(2.0, e) for e in args.l2]
    # Traces every kernel first (a few seconds each), so the rows time the attacks.
    start = time.perf_counter()
    for p in dict(points):
        kgr.evaluate_robustness(
            model, (x_test[:8], y_test[:8]), {p: [0.05]}, sanity_examples=0, verbose=0
        )
    warmup_seconds = time.perf_counter() - start
    load_before = os.getloadavg()
    rows, start = [], time.perf_counter()
    for p, epsilon in points:
        # One radius per call, so that each attack's seconds are per radius; the
        # kernels are compiled once (same model) and reused by the later calls.
        report = kgr.evaluate_robustness(
            model, data, epsilons={p: [epsilon]}, sanity_examples=0, verbose=2
        )
        for row in report.rows:
            if row["attack"] in report.seconds:
                rows.append({**row, "seconds": report.seconds[row["attack"]]})
    seconds = time.perf_counter() - start
    result = {
        "protocol": "evaluate_robustness defaults (standard suite: apgd-ce, apgd-t, fab-t, "
        "square as a cascade), one call per radius, first test images",
        "images": args.images,
        "model": "ReLU MLP 784-256-256-10, FGSM training p=inf sigma 0.1 clean_weight 0.5",
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "warmup_seconds": round(warmup_seconds, 1),
        "clean_accuracy": report.clean_accuracy,
        "rows": rows,
        "seconds_total": round(seconds, 1),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
