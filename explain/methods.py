"""The CAM methods: each a small :class:`~explain.engine.BaseCAM` subclass that overrides only its weighting.

The engine's single compiled pass gives each method ``A`` (B, h, w, k), the target layer's feature maps, and
``G = d y^c / d A``, with ``y^c`` the class score before the softmax; the method returns the weights ``W``, and
the map is ``ReLU(sum_k W_k A_k)`` (Selvaraju et al. 2017, eq. 2). A method whose weights need ``G`` only
through its spatial sums (``uses_gradient_sums``) also gives them from ``S_k = sum_ij G_ijk``, which the pass
reads off a global pooling when it can (see :mod:`explain.engine`).

The maths is written once, in ``keras.ops``: the same code runs inside the TensorFlow and the JAX pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from keras import ops

from explain.engine import BaseCAM


def _spatial_mean(tensor: Any) -> Any:
    return ops.mean(tensor, axis=(1, 2), keepdims=True)


class GradCAM(BaseCAM):
    """Selvaraju et al. 2017, eq. 1: ``alpha_k = (1/Z) sum_ij dy^c/dA^k_ij`` (y^c before the softmax)."""

    name = "gradcam"
    uses_gradient_sums = True

    def weights(self, activations: Any, gradients: Any) -> Any:
        return _spatial_mean(gradients)

    def weights_from_sums(self, gradient_sums: Any, area: Any) -> Any:
        return (gradient_sums / area)[:, None, None, :]


class GuidedGradCAM(BaseCAM):
    """The seed article's variant: ``alpha_k = mean_ij [A>0][G>0] G`` (only positive evidence at active units)."""

    name = "gradcam-guided"

    def weights(self, activations: Any, gradients: Any) -> Any:
        mask = ops.cast(ops.logical_and(activations > 0, gradients > 0), gradients.dtype)
        return _spatial_mean(mask * gradients)


class GradCAMPlusPlus(BaseCAM):
    """Chattopadhay et al. 2018, eq. 19 and 10.

    ``a_ij = G^2 / (2 G^2 + sum_ab A_ab G^3)`` (0 where the denominator is 0), ``w_k = sum_ij a_ij ReLU(G)``,
    with ``G`` the gradient of the pre-softmax score (the exp(S) factor of eq. 19 is a positive per-image scale,
    dropped as in common implementations).
    """

    name = "gradcam++"

    def weights(self, activations: Any, gradients: Any) -> Any:
        squared = ops.square(gradients)
        denominator = 2.0 * squared + ops.sum(activations, axis=(1, 2), keepdims=True) * squared * gradients
        nonzero = ops.not_equal(denominator, 0.0)
        alpha = ops.where(nonzero, squared / ops.where(nonzero, denominator, ops.ones_like(denominator)), 0.0)
        return ops.sum(alpha * ops.relu(gradients), axis=(1, 2), keepdims=True)


class HiResCAM(BaseCAM):
    """Draelos & Carin 2020, eq. 5: element-wise ``W = G``, i.e. ``ReLU(sum_k G_k * A_k)`` without pooling."""

    name = "hirescam"

    def weights(self, activations: Any, gradients: Any) -> Any:
        return gradients


class LayerCAM(BaseCAM):
    """Jiang et al. 2021, eq. 7-8: element-wise ``W = ReLU(G)``, map ``ReLU(sum_k ReLU(G_k) * A_k)``."""

    name = "layercam"

    def weights(self, activations: Any, gradients: Any) -> Any:
        return ops.relu(gradients)


METHODS: Mapping[str, type[BaseCAM]] = MappingProxyType(
    {method.name: method for method in (GradCAM, GuidedGradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM)}
)
