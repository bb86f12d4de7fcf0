"""The paper's networks (docs/method.md, section 3), as `kgr.RegularizedModel`s.

Each builder returns an uncompiled model ending in float32 logits (train it
with `from_logits=True`). The paper's are built after the maxout paper's
pylearn2 configs
(scripts/papers/maxout/{mnist_pi,mnist,cifar10_no_aug_valid}.yaml):

- dropout on the input of every layer: `input_dropout` before the first,
  `hidden_dropout` before each later one, including the logits layer
  (`kgr.layers.FastDropout`);
- max-norm constraints on each output unit's incoming weights: `max_norm`
  on dense layers (pylearn2's `max_col_norm`) and later convolutions,
  `first_conv_max_norm` on the first convolution (`max_kernel_norm: .9`);
- convolutional maxout layers: zero padding, a valid convolution with
  `channels * pieces` filters, maxout over contiguous groups of `pieces`,
  then max pooling that rounds the output size up like cuda-convnet.

Known differences from pylearn2: Keras's default initialisers instead of
uniform(-0.005, 0.005), and Keras's inverted dropout, which scales kept
inputs by 1 / (1 - rate) during training (pylearn2 used no scale on the
input layer). Neither changes what the network can represent.

Besides them, `cnn` is the field's standard MNIST CNN (Madry et al. 2018:
conv 32, conv 64, dense 1024), with widths and activation ("relu", "gelu",
"softplus", "maxout") as arguments and no dropout or max-norm by default.

```python
model = kgr.networks.maxout_mlp(regularizer=kgr.GradientRegularizer(p=2, sigma=0.1))
```
"""

from keras_gradreg.networks.cnn import cnn
from keras_gradreg.networks.conv_maxout import (
    CIFAR10_LAYERS,
    MNIST_LAYERS,
    ConvMaxoutLayer,
    conv_maxout,
    conv_maxout_cifar10,
    conv_maxout_mnist,
)
from keras_gradreg.networks.mlp import maxout_mlp, mlp, sigmoid_mlp

# The paper's four networks and the field's standard MNIST CNN, by name.
NETWORKS = {
    "sigmoid_mlp": sigmoid_mlp,
    "maxout_mlp": maxout_mlp,
    "conv_maxout_mnist": conv_maxout_mnist,
    "conv_maxout_cifar10": conv_maxout_cifar10,
    "cnn": cnn,
}

__all__ = [
    "CIFAR10_LAYERS",
    "MNIST_LAYERS",
    "NETWORKS",
    "ConvMaxoutLayer",
    "cnn",
    "conv_maxout",
    "conv_maxout_cifar10",
    "conv_maxout_mnist",
    "maxout_mlp",
    "mlp",
    "sigmoid_mlp",
]
