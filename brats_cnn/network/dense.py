"""The dense (fully convolutional, full-resolution) form of the patch networks: fast-mode inference
(``inference.predict.predict_fast``) and dense training (``train.mode: dense``) run the same weights through it.

Every ``MaxPool2d(k, stride s)`` of a :class:`~brats_cnn.network.model.PereiraCNN` becomes a stride-1 pool
and multiplies the dilation of every later layer by ``s``, so every voxel gets its own output at
full resolution; the FC layers run as convolutions (the first as an ``n x n`` convolution dilated by
the removed strides). See docs/segmentation.md, "Modes".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from brats_cnn.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from brats_cnn.network.model import PereiraCNN

@dataclass
class FullyConvolutional:
    """The dense (shift-free, full-resolution) form of a patch network.

    Attributes:
        features: convolutions with dilation, stride-1 pools; ``(B, 4, H, W) -> (B, F, H, W)``
            with "same" padding, so position ``b`` of the output is aligned with input ``b``.
        classifier: the network's own FC layers, applied to a ``(N, F, n, n)`` neighbourhood.
        head_size: ``n`` (7 for 33x33 patches), the feature-map size the first FC layer reads.
        head_dilation: spacing of that neighbourhood in input voxels (4 after two stride-2 pools).
        shift: the exact network's FC window for the voxel at ``c`` is centred at dense position
            ``c + shift`` (-1 for the paper's networks: pooling 33 -> 16 -> 7 drops the last row).
        context: the context pathway's dense form (``model.context`` k > 1), whose ``features`` start
            with a stride-1 ``k x k`` average and whose dilations, ``head_dilation`` and ``shift`` are
            ``k`` times the main pathway's; None without one.
    """

    features: "nn.Module"
    classifier: "nn.Module"
    head_size: int
    head_dilation: int
    shift: int
    context: "FullyConvolutional | None" = None

    @property
    def head_reach(self) -> int:
        """Distance from the centre to the edge of the FC neighbourhood, in voxels."""
        return self.head_dilation * (self.head_size - 1) // 2

    def window_lead(self, half: int) -> int:
        """Start of the first FC window inside a crop with a margin of ``half`` voxels (InputError if none fits)."""
        lead = half + self.shift - self.head_reach
        if lead < 0 or half - self.shift - self.head_reach < 0:
            raise InputError("fast mode needs the FC neighbourhood to fit inside the patch margin")
        return lead

    def convolutional_head(self) -> "DenseHead":
        """The FC layers as convolutions (inference): the first as an ``n x n`` convolution dilated by
        :attr:`head_dilation` (its weight viewed as ``(out, F, n, n)``; with a context pathway, a second
        one dilated by the context's, over its columns of the weight), the others as 1x1; dropout,
        an identity in eval mode, is left out. ``(B, F, S + 2 reach, S' + 2 reach) -> (B, C, S, S')``
        logits, with no per-voxel gather of neighbourhoods."""

        first: list[nn.Module] = []
        layers: list[nn.Module] = []
        for layer in self.classifier:
            if isinstance(layer, nn.Linear) and not first:
                n = self.head_size
                weight = layer.weight.detach().view(layer.out_features, -1, n, n)
                pathways = [self] + ([self.context] if self.context is not None else [])
                for pathway, columns in zip(pathways, weight.split(_feature_widths(self, weight.shape[1]), dim=1)):
                    conv = nn.utils.skip_init(nn.Conv2d, columns.shape[1], layer.out_features, n,
                                              dilation=pathway.head_dilation, bias=not first)
                    conv.weight.data.copy_(columns)
                    if not first:
                        conv.bias.data.copy_(layer.bias.detach())
                    first.append(conv)
            elif isinstance(layer, nn.Linear):
                conv = nn.utils.skip_init(nn.Conv2d, layer.in_features, layer.out_features, 1)
                conv.weight.data.copy_(layer.weight.detach().view(layer.out_features, -1, 1, 1))
                conv.bias.data.copy_(layer.bias.detach())
                layers.append(conv)
            elif not isinstance(layer, (nn.Flatten, nn.Dropout)) and first:
                layers.append(copy.deepcopy(layer))
        return DenseHead(first[0], first[1] if len(first) > 1 else None, nn.Sequential(*layers)).eval()


def _feature_widths(dense: FullyConvolutional, total: int) -> list[int]:
    """Channels of the main (and context) feature maps the first FC layer reads, in its column order."""
    if dense.context is None:
        return [total]
    context = _out_channels(dense.context.features)
    return [total - context, context]


def _out_channels(features: "nn.Module") -> int:
    return [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class DenseHead(nn.Module):
    """The FC layers as convolutions (:meth:`FullyConvolutional.convolutional_head`): ``first`` reads the
    main feature map, ``first_context`` (when the network has a context pathway) the context one; their
    sum (the first FC layer on the concatenated features) goes through ``rest``."""

    def __init__(self, first: "nn.Module", first_context: "nn.Module | None", rest: "nn.Module"):
        super().__init__()
        self.first, self.first_context, self.rest = first, first_context, rest

    def forward(self, main: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.first(main)
        if self.first_context is not None:
            x = x + self.first_context(context)
        return self.rest(x)


def _dilated_max_pool(kernel: int, dilation: int) -> "nn.Module":
    """A stride-1 ``kernel x kernel`` max-pool dilated by ``dilation``, padded with -inf ("same" size).

    Computes exactly what ``ConstantPad2d(-inf)`` + ``MaxPool2d(kernel, 1, dilation=dilation)`` do,
    as elementwise maxima of shifted views, one axis at a time (separable): 2-4x faster on a CPU
    for the dilated pools of fast mode (benchmarks/bench_segment.py), no index bookkeeping. Used
    for inference only; dense training keeps ``nn.MaxPool2d`` (its gradient picks one input on ties).
    """

    class SeparableMaxPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel, self.dilation = kernel, dilation

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d, k = self.dilation, self.kernel
            reach = d * (k // 2)
            x = nn.functional.pad(x, (reach, reach, reach, reach), value=float("-inf"))
            for axis in (-1, -2):
                size = x.shape[axis] - 2 * reach
                out = x.narrow(axis, 0, size)
                for tap in range(1, k):
                    out = torch.maximum(out, x.narrow(axis, tap * d, size))
                x = out
            return x

        def extra_repr(self) -> str:
            return f"kernel_size={self.kernel}, stride=1, dilation={self.dilation}"

    return SeparableMaxPool()


def to_fully_convolutional(network: "nn.Module", share: bool = False) -> FullyConvolutional:
    """Turn a trained patch network into its dense equivalent.

    Every ``MaxPool2d(k, stride s)`` becomes a stride-1 ``k x k`` max-pool and multiplies the
    dilation of every later layer by ``s``; convolutions keep their weights with ``dilation = d``
    and ``padding = d``. The FC layers stay as they are; :func:`predict_fast` runs them as
    convolutions (:meth:`FullyConvolutional.convolutional_head`).

    Args:
        share: False (inference): the dense form holds copies of the weights, in eval mode, and its
            pools are the separable :func:`_dilated_max_pool`. True (dense training,
            :class:`DenseNetwork`): it holds ``network``'s own parameters, so gradients and
            optimiser steps through it change ``network``; its pools are ``nn.MaxPool2d``; its
            train/eval mode is left as it is.
    """

    net = network if share else copy.deepcopy(network).eval()
    if share and getattr(net, "context_features", None) is not None:
        raise InputError("dense training does not take a context pathway (model.context > 1): train.mode: patch")
    features, size, dilation, centre = _dense_stack(net.features, share, 1, net.patch_size)
    dense = FullyConvolutional(features, net.classifier, size, dilation, centre - net.patch_size // 2)
    if getattr(net, "context_features", None) is not None:
        k = net.context
        average = nn.AvgPool2d(k, stride=1, padding=k // 2)  # "same": position b averages the block centred on b
        stack, size, dilation, centre = _dense_stack(net.context_features, share, k, net.patch_size)
        # context-grid index i is the block centred on input k*i + k//2; the patch centre is block patch_size//2
        dense.context = FullyConvolutional(nn.Sequential(average, *stack).eval(), net.classifier, size, dilation,
                                           centre - k * (net.patch_size // 2))
    return dense


def _dense_stack(stack: "nn.Module", share: bool, dilation: int, size: int) -> tuple["nn.Sequential", int, int, int]:
    """One pathway's dense layers, from input dilation ``dilation`` (the context pathway's factor) and
    patch side ``size`` (on the pathway's own grid).

    Returns:
        ``(features, size, dilation, centre)``: the dense layers; the final feature-map side of the
        patch form; the final dilation; the centre of the patch form's final feature map, in input
        voxels from the patch (or context grid) start.
    """
    layers: list[nn.Module] = []
    origin = 0  # patch coordinate of feature-map index 0, in input voxels
    for layer in stack:
        if isinstance(layer, nn.Conv2d):
            (k, _) = layer.kernel_size
            # skip_init: no random initialisation to overwrite, so the global RNG is left alone (a
            # whole-volume validation in the middle of an epoch must not shift the dropout masks)
            dense = nn.utils.skip_init(nn.Conv2d, layer.in_channels, layer.out_channels, k, stride=1,
                                       dilation=dilation, padding=dilation * (k // 2), bias=layer.bias is not None)
            if share:
                dense.weight, dense.bias = layer.weight, layer.bias
            else:
                dense.load_state_dict(layer.state_dict())
            layers.append(dense)
        elif isinstance(layer, nn.MaxPool2d):
            k, s = layer.kernel_size, layer.stride
            if share:  # MaxPool2d refuses padding > k // 2, so pad with -inf (never the max) explicitly
                layers += [nn.ConstantPad2d(dilation * (k // 2), float("-inf")),
                           nn.MaxPool2d(k, stride=1, dilation=dilation)]
            else:
                layers.append(_dilated_max_pool(k, dilation))
            origin += dilation * (k // 2)  # a valid k-window's centre is k//2 in from its start
            size = (size - k) // s + 1
            dilation *= s
        else:
            layers.append(layer)
    if size % 2 == 0:
        raise InputError(f"fast mode needs an odd final feature map, got {size}x{size}")
    features = nn.Sequential(*layers)
    if not share:
        features.eval()
    return features, size, dilation, origin + dilation * (size - 1) // 2


class DenseNetwork(nn.Module):
    """The fully convolutional form of a :class:`~brats_cnn.network.model.PereiraCNN` for dense training; shares its parameters.

    Maps an axial crop ``(B, 4, S + 2h, S + 2h)`` (``h`` = half a patch, 16) to logits
    ``(B, C, S, S)`` of its central ``S x S`` voxels and computes exactly what fast-mode inference
    (``inference.predict.predict_fast``) computes for them: the same dilated convolutions, padding and
    FC-window position (:func:`to_fully_convolutional`). The first FC layer runs as a 7x7
    convolution with dilation 4 (its weight viewed as ``(256, 128, 7, 7)``), the others as 1x1
    convolutions; dropout acts elementwise on the feature maps. Training through this module
    changes ``network`` itself, whose checkpoints and patch form stay as they are.
    """

    def __init__(self, network: "PereiraCNN"):
        super().__init__()
        self.network = network
        self.geometry = to_fully_convolutional(network, share=True)
        self.features = self.geometry.features  # the same Parameter objects as network.features
        self.half = network.patch_size // 2
        self.lead = self.geometry.window_lead(self.half)  # first FC-window start, as in fast mode

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, 4, S + 2h, S + 2h)`` -> ``(B, C, S, S)`` logits of the central voxels."""
        span = crops.shape[-1] - 2 * self.half + 2 * self.geometry.head_reach
        x = self.features(crops)[:, :, self.lead:self.lead + span, self.lead:self.lead + span]
        first = True
        for layer in self.network.classifier:
            if isinstance(layer, nn.Dropout):
                x = nn.functional.dropout(x, layer.p, self.training)
            elif isinstance(layer, nn.Linear):
                n = self.geometry.head_size if first else 1
                weight = layer.weight.view(layer.out_features, -1, n, n)
                x = nn.functional.conv2d(x, weight, layer.bias, dilation=self.geometry.head_dilation)
                first = False
            elif not isinstance(layer, nn.Flatten):
                x = layer(x)
        return x
