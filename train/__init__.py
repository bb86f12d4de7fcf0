"""The training binary (the commands that reproduce the tables are in experiments/).

`python -m train.main --preset=mnist_maxout_mlp --workdir=/tmp/run`; the work is
done by `train.train_lib.train_and_evaluate(config, workdir)`.
"""
