"""Models of the K-FAC experiments: the section-13 deep autoencoders and plain MLPs
(all ``nn.Sequential`` of ``nn.Linear`` + activation modules; :mod:`kfac_lab.models.networks`),
and two small CNN classifiers (:mod:`kfac_lab.models.cnn`)."""

from .cnn import FIGURE1_CNN_PARAMS, MNIST_CNN_PARAMS, figure1_cnn, mnist_cnn
from .networks import (
    ACTIVATIONS,
    AUTOENCODER_ENCODERS,
    AUTOENCODER_LOSS,
    AUTOENCODER_SIZES,
    FIGURE1_SIZES,
    autoencoder,
    count_parameters,
    default_init_,
    figure1_network,
    layer_sizes,
    linear_layers,
    mlp,
    sparse_init_,
)

__all__ = [
    "FIGURE1_CNN_PARAMS",
    "MNIST_CNN_PARAMS",
    "figure1_cnn",
    "mnist_cnn",
    "ACTIVATIONS",
    "AUTOENCODER_ENCODERS",
    "AUTOENCODER_LOSS",
    "AUTOENCODER_SIZES",
    "FIGURE1_SIZES",
    "autoencoder",
    "count_parameters",
    "default_init_",
    "figure1_network",
    "layer_sizes",
    "linear_layers",
    "mlp",
    "sparse_init_",
]
