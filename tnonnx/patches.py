"""The patches a convolution multiplies with its kernel, for data-aware fitting: im2col
rows of a Conv, and the same for a ConvTranspose (its input with zeros inserted, the
kernel flipped)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .formats.base import conv_output_size


def im2col(x: np.ndarray, kernel: tuple[int, ...], attrs: Mapping) -> np.ndarray:
    """The patches an ONNX Conv (group 1) with this kernel and these attributes multiplies
    with its weight: (B * output positions, S * prod(kernel)) rows, channel-major like
    weight.reshape(T, -1). Pads (explicit or auto_pad), strides and dilations as ONNX."""
    from numpy.lib.stride_tricks import sliding_window_view

    n = len(kernel)
    size = x.shape[2:]
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-s // st) - 1) * st + sp - s, 0) for s, st, sp in zip(size, strides, span)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        end = [t - b for t, b in zip(total, begin)]
    elif auto_pad == "VALID":
        begin = end = [0] * n
    else:
        pads = list(attrs.get("pads", [0] * 2 * n))
        begin, end = pads[:n], pads[n:]
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    windows = sliding_window_view(padded, span, axis=tuple(range(2, 2 + n)))
    # windows: (B, S, *positions, *span): subsample positions by stride, span by dilation
    index = (slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides) \
        + tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]
    b, s = x.shape[:2]
    positions = windows.shape[2:2 + n]
    order = [0] + list(range(2, 2 + n)) + [1] + list(range(2 + n, 2 + 2 * n))
    return windows.transpose(order).reshape(b * int(np.prod(positions)), s * int(np.prod(kernel)))


def patches(x: np.ndarray, kernel: tuple[int, ...], attrs: Mapping, transposed: bool = False):
    """(rows, output spatial size): the rows the canonical (Conv-layout, T x S x k...) kernel
    of a group-1 Conv, or ConvTranspose when `transposed`, multiplies to give each output
    position, channel-major like kernel.reshape(T, -1).

    A ConvTranspose (explicit pads) is a Conv of stride 1 and its dilations on the input with
    stride-1 zeros inserted between samples, padded by d(k-1) - pad_begin before and
    d(k-1) - pad_end + output_padding after (cropped where negative), with the kernel
    flipped in space: its im2col rows with each patch's kernel axes reversed."""
    if not transposed:
        rows = im2col(x, kernel, attrs)
        return rows, conv_output_size(tuple(x.shape[2:]), kernel, dict(attrs))
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    pads = list(attrs.get("pads", [0] * 2 * n))
    extra = list(attrs.get("output_padding", [0] * n))
    b, s = x.shape[:2]
    up = np.zeros((b, s) + tuple((i - 1) * st + 1 for i, st in zip(x.shape[2:], strides)), x.dtype)
    up[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)] = x
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:n])]
    end = [d * (k - 1) - p + o for d, k, p, o in zip(dilations, kernel, pads[n:], extra)]
    up = up[(slice(None), slice(None)) + tuple(slice(max(-a, 0), size - max(-e, 0))
                                               for a, e, size in zip(begin, end, up.shape[2:]))]
    up = np.pad(up, [(0, 0), (0, 0)] + [(max(a, 0), max(e, 0)) for a, e in zip(begin, end)])
    rows = im2col(up, kernel, {"dilations": dilations})
    flipped = rows.reshape((rows.shape[0], s) + tuple(kernel))[(slice(None), slice(None)) + (slice(None, None, -1),) * n]
    return flipped.reshape(rows.shape[0], -1), conv_output_size(tuple(up.shape[2:]), kernel, {"dilations": dilations})
