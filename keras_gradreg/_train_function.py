"""`fit`'s and `evaluate`'s step functions under a tf.distribute strategy.

Two things stock Keras 3 cannot do under `MirroredStrategy` (TF 2.21, Keras
3.15): compile with `jit_compile=True` (it hands the whole distributed step,
all-reduce and optimizer update included, to XLA) and run
`steps_per_execution > 1` (each step sits in a `tf.cond` inside the while
loop, where the cross-replica merge call fails: keras-team/keras#19246); and
under `MultiWorkerMirroredStrategy` its log reduction fails on scalars, in
`fit` and in `evaluate` alike.
Here XLA compiles each replica's forward and backward passes only, and the
while loop's own predicate guards each step, so no `tf.cond` wraps it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow as tf

from keras_gradreg import _internals


def make_distributed_function(model, step_function: Callable) -> Callable:
    """Builds `function(iterator) -> logs` running `step_function` on each replica.

    Serves `fit` (with `model.train_step`) and `evaluate` (`model.test_step`).

    Args:
        model: The Keras model (its strategy, `steps_per_execution` and
            `run_eagerly` are used).
        step_function: The per-replica step, `data -> logs`.

    Returns:
        A function with the contract of Keras's `model.train_function` and
        `model.test_function`: it runs up to `steps_per_execution` steps and
        raises `StopIteration` when the iterator is exhausted before the first.
    """
    steps_per_execution = model.steps_per_execution
    one_step_on_data = _none_for_optionals(
        _distributed_step(model.distribute_strategy, step_function)
    )
    multi_step_on_iterator = _multi_step(one_step_on_data, steps_per_execution)
    if not model.run_eagerly:
        multi_step_on_iterator = tf.function(multi_step_on_iterator, reduce_retracing=True)

    def function(iterator):
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            outputs = multi_step_on_iterator(iterator)
            if not outputs.has_value():
                raise StopIteration
            return outputs.get_value()
        for _, data in zip(range(steps_per_execution), iterator):
            outputs = one_step_on_data(data)
        return outputs

    return function


def _distributed_step(strategy, step_function: Callable) -> Callable:
    """`data -> logs`: `step_function` on every replica, logs averaged over replicas."""

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        outputs = strategy.run(step_function, args=(data,))
        # Keras's reduce_per_replica reduces scalars on axis 0 under
        # MultiWorkerMirroredStrategy, which fails; the logs are scalars.
        return tf.nest.map_structure(
            lambda value: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None),
            outputs,
        )

    return one_step_on_data


def _none_for_optionals(step: Callable) -> Callable:
    """`step` with `tf.experimental.Optional` leaves of its data replaced by None.

    As Keras's trainer does: an absent `sample_weight` arrives as an empty Optional.
    """

    @functools.wraps(step)
    def wrapper(data):
        return step(
            tf.nest.map_structure(
                lambda item: None if isinstance(item, tf.experimental.Optional) else item, data
            )
        )

    return wrapper


def _multi_step(one_step_on_data: Callable, steps_per_execution: int) -> Callable:
    """`iterator -> Optional(logs)`: up to `steps_per_execution` steps in one while loop.

    The loop's own predicate guards each step, so no `tf.cond` wraps a step
    (a cross-replica merge call inside a `tf.cond` fails).
    """

    @tf.autograph.experimental.do_not_convert
    def multi_step_on_iterator(iterator):
        if steps_per_execution == 1:
            return tf.experimental.Optional.from_value(one_step_on_data(iterator.get_next()))
        # The spec of the outputs is only known once the body is traced.
        empty_outputs = tf.experimental.Optional.empty(None)

        def cond(step, unused_outputs, next_inputs):
            return tf.logical_and(tf.less(step, steps_per_execution), next_inputs.has_value())

        def body(step, unused_outputs, next_inputs):
            outputs = tf.experimental.Optional.from_value(one_step_on_data(next_inputs.get_value()))
            _internals.set_element_spec(empty_outputs, outputs.element_spec)
            next_inputs = tf.cond(
                tf.less(step + 1, steps_per_execution),
                iterator.get_next_as_optional,
                lambda: next_inputs,
            )
            return step + 1, outputs, next_inputs

        _, outputs, _ = tf.while_loop(
            cond, body, [tf.constant(0), empty_outputs, iterator.get_next_as_optional()]
        )
        _internals.set_element_spec(outputs, empty_outputs.element_spec)
        return outputs

    return multi_step_on_iterator
