"""Semi-tensor-product convolutions: K = K' (x) I_t on the channels (stt, str, sttu).

The channel index is c = c' t + s (T = T' t, S = S' t); K'[a, b] = mean_s K[a t + s, b t + s]
is the least squares projection on this structure (Pythagoras: projection error +
decomposition error), and K' goes to the base format's conv fit. A conv with such a
kernel applies K' to each of the t interleaved channel groups; the emission never
repeats a parameter and uses standard ops only:

- 1-D/2-D kernels ("lifted"): Reshape x to (B, S', t, spatial) and run the base's conv
  factorization one spatial dimension higher, fitted on K' with a kernel of size 1 on
  the t axis (stride 1, no padding there), then Reshape back to (B, T' t, ...).
- 3-D kernels ("folded", ONNX Runtime has no 4-D Conv): Reshape/Transpose/Reshape the
  channels to s-major (B, t S', ...), fold t into the batch (B t, S', ...), run the base,
  unfold and turn the channels back. Two activation transposes; exact.

Any base works (its own emit, torch module and MACs: TT stages, the TR ring's batch
folding, ...). STTu mixes STP pieces (its factors) with a plain piece (its core, on all
the channels); STPConv handles both. Spatial sizes are read at run time (Shape, Gather,
Concat), so symbolic batch and spatial dimensions work. The bias is a final Add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..emit import Builder, conv_node
from .base import ConvGeometry, Factorization, RankSpec, conv_output_size, permute
from .stp import STPNotApplicable, _check_ratio, reduced_spec


def kron_channels(w: np.ndarray, t: int) -> np.ndarray:
    """(o, i, k...) -> (o t, i t, k...): W (x) I_t on the two channel axes."""
    full = np.einsum("oi...,st->osit...", w, np.eye(t))
    return full.reshape((w.shape[0] * t, w.shape[1] * t) + w.shape[2:])


def s_major(w, t: int):
    """A plain (o t, i t, k...) weight in interleaved channel order (c' t + s) re-ordered
    to s-major (s C' + c') on both channel axes; numpy or torch."""
    o, i, k = w.shape[0] // t, w.shape[1] // t, tuple(w.shape[2:])
    perm = (1, 0, 3, 2) + tuple(range(4, 4 + len(k)))
    return permute(w.reshape((o, t, i, t) + k), perm).reshape((o * t, i * t) + k)


def with_t_axis(attrs: dict) -> dict:
    """Conv attributes one spatial dimension higher: kernel 1, stride 1, no pad on t."""
    out = dict(attrs)
    for key in ("kernel_shape", "strides", "dilations"):
        if key in out:
            out[key] = [1] + list(out[key])
    if "pads" in out:
        p = list(out["pads"])
        out["pads"] = [0] + p[: len(p) // 2] + [0] + p[len(p) // 2:]
    return out


def lifted(nsp: int) -> bool:
    """1-D/2-D kernels carry the sub-index as an extra spatial axis; 3-D ones (ONNX
    Runtime has no 4-D Conv) fold it into the batch."""
    return nsp <= 2


@dataclass
class STPConv(Factorization):
    """A conv as a sequence of pieces on shared channel layouts. A piece flagged in `stp`
    is a conv factorization of reduced channels (any format: its own emit, torch module
    and MACs) acting as (piece) (x) I_t; lifted (see `lifted`) it was fitted with a kernel
    of size 1 on the extra t axis. An unflagged piece is one ConvStage, a plain conv on
    the full channels (interleaved order c' t + s). Channel layouts: lifted, (B, C', t, sp)
    for STP pieces and (B, C, sp) for plain ones, reshapes between; folded, the input is
    turned s-major (B, t C', sp) and STP pieces see (B t, C', sp), plain ones (B, t C', sp)
    with their weight re-ordered s-major, reshapes between, and the output is turned back."""

    format: str
    pieces: list
    stp: tuple[bool, ...]
    cores: dict[str, np.ndarray]  # every core; plain stages build from these
    ranks: tuple[int, ...]
    kernel: tuple[int, ...]
    channels: tuple[int, int]  # (T, S)
    t: int
    projection_error: float = 0.0
    decomposition_error: float = 0.0

    @property
    def lifted(self) -> bool:
        return lifted(len(self.kernel))

    def params(self) -> int:
        return sum(p.params() if s else p.build(self.cores).size for p, s in zip(self.pieces, self.stp))

    def piece_geometry(self, geometry: ConvGeometry, size=None) -> ConvGeometry:
        """The geometry an STP piece sees (input spatial size `size`, when known)."""
        if not self.lifted:
            return ConvGeometry(geometry.kernel, geometry.attrs, size)
        size = None if size is None else (self.t,) + tuple(size)
        return ConvGeometry((1,) + tuple(geometry.kernel), with_t_axis(geometry.attrs), size)

    def to_dense(self) -> np.ndarray:
        out = None
        for piece, s in zip(self.pieces, self.stp):
            if s:
                w = piece.to_dense()
                w = kron_channels(w[:, :, 0] if self.lifted and w.ndim > 2 else w, self.t)
            else:
                w = piece.build(self.cores)
            if w.ndim > 2 and all(v == 1 for v in w.shape[2:]):
                w = w.reshape(w.shape[:2])
            if out is None:
                out = w
            elif w.ndim == 2:
                out = w @ out if out.ndim == 2 else np.einsum("os,si...->oi...", w, out)
            else:  # one spatial piece at most
                out = np.einsum("os...,si->oi...", w, out)
        return out.reshape(out.shape + (1,) * (len(self.kernel) + 2 - out.ndim))

    def macs(self, geometry: ConvGeometry) -> int:
        """Per sample, following the spatial size through the pieces."""
        size, total = tuple(geometry.in_spatial), 0
        for piece, s in zip(self.pieces, self.stp):
            if s:
                g = self.piece_geometry(geometry, size)
                total += piece.macs(g) * (1 if self.lifted else self.t)
                size = g.in_spatial
                for stage, w in zip(piece.stages, piece.stage_weights()):
                    size = conv_output_size(size, tuple(w.shape[2:]), stage.conv_attrs(g))
                size = size[1:] if self.lifted else size
            else:
                w = piece.build(self.cores)
                size = conv_output_size(size, tuple(w.shape[2:]), piece.conv_attrs(geometry))
                total += math.prod(size) * math.prod(w.shape)
        return total

    def emit(self, builder: Builder, x: str, geometry: ConvGeometry, bias: np.ndarray | None, output: str) -> str:
        t, nsp, (n_out, n_in) = self.t, len(self.kernel), self.channels
        split, c = False, n_in
        if not self.lifted:
            x = _onnx_regroup(builder, x, n_in // t, t, nsp)
        for piece, s in zip(self.pieces, self.stp):
            if s != split:  # change layout
                if self.lifted:
                    x = _onnx_reshape(builder, x, [0, c // t, t] if s else [0, c], 2 if s else 3, nsp)
                else:
                    x = _onnx_reshape(builder, x, [-1, c // t] if s else [-1, c], 2, nsp)
                split = s
            if s:
                x = piece.emit(builder, x, self.piece_geometry(geometry), None, builder.fresh("stp"))
                c = piece.channels[0] * t
            else:
                w = piece.build(self.cores)
                w = w if self.lifted else s_major(w, t)
                x = conv_node(builder, x, w, "conv", attrs=piece.conv_attrs(geometry))
                c = w.shape[0]
        if split:
            x = _onnx_reshape(builder, x, [0, c] if self.lifted else [-1, c], 3 if self.lifted else 2, nsp)
        if not self.lifted:
            x = _onnx_regroup(builder, x, t, n_out // t, nsp)
        if bias is not None:
            x = builder.op("Add", [x, builder.cast(builder.constant(bias.reshape((-1,) + (1,) * nsp), "bias"))], "bias")
        builder.rename_output(output)
        return output

    def torch_module(self, geometry: ConvGeometry, bias: np.ndarray | None = None):
        from .stp_torch import STPConvModule

        return STPConvModule(self, geometry, bias)


def _onnx_reshape(builder: Builder, x: str, lead: list[int], start: int, nsp: int) -> str:
    """Reshape x to (*lead, its axes start..start+nsp) at run time (0 copies the batch)."""
    shape = builder.op("Shape", [x], "shape")
    spatial = builder.op("Gather", [shape, builder.int64s(list(range(start, start + nsp)))], "spatial", axis=0)
    target = builder.op("Concat", [builder.int64s(list(lead)), spatial], "target", axis=0)
    return builder.op("Reshape", [x, target], "reshape")


def _onnx_regroup(builder: Builder, x: str, a: int, b: int, nsp: int) -> str:
    """Channels (a, b) -> (b, a): interleaved <-> s-major."""
    x = _onnx_reshape(builder, x, [0, a, b], 2, nsp)
    x = builder.op("Transpose", [x], "transpose", perm=[0, 2, 1] + list(range(3, 3 + nsp)))
    return _onnx_reshape(builder, x, [0, a * b], 3, nsp)


def project_conv(kernel: np.ndarray, t: int) -> np.ndarray:
    """K' (T/t, S/t, k...): the mean over the diagonal channel sub-indices."""
    n_out, n_in = kernel.shape[:2]
    if n_out % t or n_in % t:
        raise STPNotApplicable(f"conv with {n_out} out / {n_in} in channels: STP needs stp_t={t} to divide both")
    k = kernel.shape[2:]
    return np.einsum("asbs...->ab...", kernel.reshape((n_out // t, t, n_in // t, t) + k)) / t


def fit_conv_stp(name: str, base_fit, kernel: np.ndarray, spec: RankSpec, *, t: int, **options) -> STPConv:
    """Project K on K' (x) I_t and fit K' with `base_fit` (a format's fit_conv)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    reduced = project_conv(kernel, t)
    norm = float(np.linalg.norm(kernel))
    projection = float(np.linalg.norm(kernel - kron_channels(reduced, t)))
    rspec = reduced_spec(spec, projection, norm, math.sqrt(t) * np.linalg.norm(reduced), t * t)
    nsp = kernel.ndim - 2
    base = base_fit(reduced[:, :, None] if lifted(nsp) else reduced, rspec, **options)
    fact = STPConv(name, [base], (True,), base.cores, base.ranks, kernel.shape[2:], kernel.shape[:2], t)
    fact.projection_error = projection / max(norm, 1e-300)
    fact.decomposition_error = math.sqrt(t) * float(np.linalg.norm(reduced - base.to_dense().reshape(reduced.shape)))
    fact.decomposition_error /= max(norm, 1e-300)
    _check_ratio(fact, kernel.size, spec)
    return fact
