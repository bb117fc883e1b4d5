"""What every format provides, and the shared machinery of chain and conv formats.

A format fits a dense weight (`y = x W`, W of shape N x M) or a conv kernel (T x S x k...)
and returns a Factorization that knows its parameters, its MACs, how to rebuild the dense
weight (for tests and error measurement), how to emit its ONNX subgraph, and the torch
module computing the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..emit import Builder, Chain, NumpyOps, conv_node, emit_chain, emit_chain_einsum, onnx_activation, run_chain


@dataclass(frozen=True)
class RankSpec:
    """How to choose ranks: a cap, a relative Frobenius tolerance, or a compression ratio."""

    rank: int | str | None = None  # a cap, or "vbmf" (formats with SUPPORTS_VBMF)
    tol: float | None = None
    ratio: float | None = None
    # ranks at or above `align` become multiples of it (--quantize int4: whole blocks); svd
    # rounds a --tol rank up (the tolerance stays met) and a --ratio cap down (the ratio does)
    align: int = 1

    def aligned(self, r: int, up: bool, full: int | None = None) -> int:
        """r as a multiple of `align` when r >= align (up: at most `full`)."""
        a = self.align
        if a <= 1 or r < a:
            return r
        r = -(-r // a) * a if up else r // a * a
        return min(r, full) if full is not None else r

    def describe(self) -> str:
        if self.tol is not None:
            return f"tol {self.tol:g}"
        if self.ratio is not None:
            return f"ratio {self.ratio:g}x"
        return f"rank {self.rank}"


@dataclass
class ConvGeometry:
    """The conv attributes a factorised conv must keep on its spatial stage."""

    kernel: tuple[int, ...]
    attrs: dict  # strides, pads, dilations, auto_pad (ConvTranspose: output_padding/shape) as found on the node
    in_spatial: tuple[int, ...] | None = None  # per-sample spatial sizes, when known
    out_spatial: tuple[int, ...] | None = None
    # a ConvTranspose: the spatial stage is a ConvTranspose with these attributes, the
    # pointwise stages plain 1x1 Convs (channel maps commute with the transposed conv)
    transposed: bool = False

    def pointwise_attrs(self) -> dict:
        return {"kernel_shape": [1] * len(self.kernel)}

    def spatial_attrs(self) -> dict:
        return dict(self.attrs, kernel_shape=list(self.kernel))


class Factorization:
    format: str
    cores: dict[str, np.ndarray]
    ranks: tuple[int, ...]
    linear = True  # False for nonlinear chains (NTT, NTR): no dense weight to rebuild
    weight_error: float | None = None  # set by the fitter
    output_error: float | None = None  # on calibration data, set by the fitter when it has some
    measured = False  # the fitter has set the errors (Fitter.fit, measure=True)

    def params(self) -> int:
        return int(sum(c.size for c in self.cores.values()))

    def to_dense(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def relative_error(self, weight: np.ndarray, dense: np.ndarray | None = None) -> float:
        """||weight - to_dense()|| / ||weight||; `dense`: to_dense() when the caller has it."""
        dense = self.to_dense() if dense is None else dense
        # by blocks of rows: one weight-sized temporary (the dense rebuild), not two
        step = max(1, (1 << 22) // max(1, dense[:1].size))
        err2 = sum(float(np.sum(np.square(dense[i:i + step] - weight[i:i + step])))
                   for i in range(0, len(dense), step))
        return float(np.sqrt(err2) / max(np.linalg.norm(weight), 1e-300))


# ---------------------------------------------------------------------- dense (chains)


def _no_dense_weight(fact, activation: str):
    return ValueError(f"{fact.format}: a nonlinear factorisation ({activation} between its cores) has no dense "
                      "weight; compare outputs instead (LayerData.output_error)")


@dataclass
class ChainFactorization(Factorization):
    """A dense layer evaluated as a chain of cores (svd, tt, tr, ht, ...). With an activation
    on the chain (ntt, ntr) the layer is nonlinear: the order of `chain.steps` is then part
    of the function, and there is no dense weight."""

    format: str
    chain: Chain
    cores: dict[str, np.ndarray]
    ranks: tuple[int, ...]
    modes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def linear(self) -> bool:
        return self.chain.activation is None

    def to_dense(self) -> np.ndarray:
        """Contract the cores with each other (cheaper than pushing an identity through)."""
        chain = self.chain
        if chain.activation is not None:
            raise _no_dense_weight(self, chain.activation)
        ids = {label: i for i, label in enumerate(chain.sizes)}
        operands = [x for core in chain.steps for x in (self.cores[core.key], [ids[l] for l in core.labels])]
        out = [ids[l] for l in chain.in_labels + chain.out_labels]
        dense = np.einsum(*operands, out, optimize="greedy")
        return dense.reshape(chain.in_features, chain.out_features)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return run_chain(NumpyOps(batch_rank=x.ndim - 1), x, self.chain, self.cores)

    def macs(self, rows: int) -> int:
        return rows * self.chain.macs_per_row()

    def emit(self, builder: Builder, x: str, batch_rank: int) -> str:
        return emit_chain(builder, x, self.chain, self.cores, batch_rank)

    def emit_features_first(self, builder: Builder, x: str, batch_rank: int, layout=None) -> str:
        """Rows trailing, cores multiplied from the left (emit_layout.py): fewer Transposes
        at many rows; which emission is faster for a layer is measured, not assumed.
        `layout`: one of emit_layout.layout_candidates(self.chain), else the cheapest."""
        from ..emit_layout import emit_chain_features_first

        return emit_chain_features_first(builder, x, self.chain, self.cores, batch_rank, layout)

    def emit_einsum(self, builder: Builder, x: str, batch_rank: int) -> str:
        return emit_chain_einsum(builder, x, self.chain, self.cores, batch_rank)

    def emit_custom(self, builder: Builder, x: str, batch_rank: int) -> str:
        from ..custom_ops import emit_chain_custom

        return emit_chain_custom(builder, x, self.chain, self.cores, batch_rank)

    def torch_module(self):
        from ..nn.modules import ChainLinear

        return ChainLinear(self.chain, self.cores)


# ---------------------------------------------------------------------- conv (stages)


@dataclass
class ConvStage:
    """One Conv of a factorised conv: its weight is built from some cores (in numpy for
    fitting and torch, offline for ONNX) and it is either pointwise or the spatial stage."""

    build: object  # callable(cores dict) -> weight (out, in/group, *kernel); numpy or torch alike
    spatial: bool
    # keys of a train of 3-way cores whose merge, reshaped, is the weight: the ONNX graph
    # then stores whichever is smaller, the cores (merged in-graph, folded at load) or the weight
    train: tuple[str, ...] = ()
    group: int = 1
    # the Conv attributes of this stage (strides, pads, ...); default: the original layer's
    # for the spatial stage, none (stride 1, no padding) for pointwise stages
    attrs: object = None  # callable(ConvGeometry) -> dict

    def conv_attrs(self, geometry: ConvGeometry) -> dict:
        if self.attrs is not None:
            out = dict(self.attrs(geometry))
        else:
            out = geometry.spatial_attrs() if self.spatial else geometry.pointwise_attrs()
        if self.group != 1:
            out["group"] = self.group
        return out


@dataclass
class ConvFactorization(Factorization):
    """A conv as a sequence of Convs (stages). With an `activation` it is applied after every
    stage but the last (ntt, ntr): the layer is then nonlinear and has no dense kernel."""

    format: str
    stages: list[ConvStage]
    cores: dict[str, np.ndarray]
    ranks: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    channels: tuple[int, int] = (0, 0)  # (T out, S in)
    activation: str | None = None

    @property
    def linear(self) -> bool:
        return self.activation is None

    def params(self) -> int:
        """What the emitted graph stores (see ConvStage.train)."""
        return sum(self._stored_size(stage, w) for stage, w in zip(self.stages, self.stage_weights()))

    def _stored_size(self, stage: ConvStage, weight: np.ndarray) -> int:
        if stage.train:
            return min(weight.size, sum(self.cores[k].size for k in stage.train))
        return weight.size

    def stage_weights(self, cores: dict | None = None) -> list:
        return [stage.build(self.cores if cores is None else cores) for stage in self.stages]

    def to_dense(self) -> np.ndarray:
        """Compose the stages into one T x S x k kernel: pointwise stages are matrices and
        one ungrouped stage is spatial. Formats with grouped stages or several spatial
        stages (CP-4) override this."""
        if self.activation is not None:
            raise _no_dense_weight(self, self.activation)
        weights = self.stage_weights()
        out = None
        for w, stage in zip(weights, self.stages):
            if stage.spatial:
                out = w if out is None else np.einsum("os...,si->oi...", w, out)
            else:
                m = w.reshape(w.shape[0], w.shape[1])
                if out is None:
                    out = m
                elif out.ndim == 2:
                    out = m @ out
                else:
                    out = np.einsum("os,si...->oi...", m, out)
        return out

    def macs(self, geometry: ConvGeometry) -> int:
        """Per sample, following the spatial size through the stages (a ConvTranspose stage
        costs per input position)."""
        size, total = tuple(geometry.in_spatial), 0
        for w, stage in zip(self.stage_weights(), self.stages):
            per_position = w.shape[0] * w.shape[1] * math.prod(w.shape[2:])
            if geometry.transposed and stage.spatial:
                total += math.prod(size) * per_position
                size = conv_transpose_output_size(size, tuple(w.shape[2:]), stage.conv_attrs(geometry))
            else:
                size = conv_output_size(size, tuple(w.shape[2:]), stage.conv_attrs(geometry))
                total += math.prod(size) * per_position
        return total

    def emit(self, builder: Builder, x: str, geometry: ConvGeometry, bias: np.ndarray | None, output: str) -> str:
        """Conv nodes in both emission modes: ONNX Runtime's Conv beats any Einsum form.
        For a ConvTranspose layer the spatial stage is a ConvTranspose (weight in its layout)."""
        weights = self.stage_weights()
        for i, (w, stage) in enumerate(zip(weights, self.stages)):
            last = i == len(self.stages) - 1
            attrs = stage.conv_attrs(geometry)
            op = "Conv"
            if geometry.transposed and stage.spatial:
                op, w = "ConvTranspose", flip_kernel(w, stage.group)
            elif stage.train and self._stored_size(stage, w) < w.size:
                w = self._merge_in_graph(builder, stage.train, w.shape)
            x = conv_node(builder, x, w, "conv", bias=bias if last else None, attrs=attrs,
                          output=output if last else None, op=op)
            if self.activation is not None and not last:
                x = onnx_activation(builder, x, self.activation)
        return x

    def _merge_in_graph(self, builder: Builder, keys: tuple[str, ...], shape) -> str:
        """MatMuls over the train's cores (initializers only: ONNX Runtime folds them)."""
        first = self.cores[keys[0]]
        merged = builder.weight(first.reshape(-1, first.shape[2]), "core")
        for key in keys[1:]:
            core = self.cores[key]
            merged = builder.op("MatMul", [merged, builder.weight(core.reshape(core.shape[0], -1), "core")], "merge")
            merged = builder.op("Reshape", [merged, builder.int64s([-1, core.shape[2]])], "merge")
        return builder.op("Reshape", [merged, builder.int64s(list(shape))], "merge")

    def torch_module(self, geometry: ConvGeometry, bias: np.ndarray | None = None):
        from ..nn.modules import StagedConv

        return StagedConv(self, geometry, bias)


def conv_output_size(size: tuple[int, ...], kernel: tuple[int, ...], attrs: dict) -> tuple[int, ...]:
    """Spatial output size of an ONNX Conv (explicit pads or auto_pad)."""
    n = len(size)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-s // st) for s, st in zip(size, strides))
    pads = [0] * 2 * n if auto_pad == "VALID" else attrs.get("pads", [0] * 2 * n)
    return tuple((s + pads[i] + pads[i + n] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                 for i, s in enumerate(size))


def conv_transpose_output_size(size: tuple[int, ...], kernel: tuple[int, ...], attrs: dict) -> tuple[int, ...]:
    """Spatial output size of an ONNX ConvTranspose (output_shape, auto_pad or pads)."""
    n = len(size)
    if attrs.get("output_shape"):
        return tuple(attrs["output_shape"][-n:])
    strides = attrs.get("strides", [1] * n)
    if attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(s * st for s, st in zip(size, strides))
    dilations = attrs.get("dilations", [1] * n)
    extra = attrs.get("output_padding", [0] * n)
    pads = [0] * 2 * n if attrs.get("auto_pad") == "VALID" else attrs.get("pads", [0] * 2 * n)
    return tuple(strides[i] * (s - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[i + n]
                 for i, s in enumerate(size))


def flip_kernel(w: np.ndarray, group: int = 1) -> np.ndarray:
    """A grouped Conv kernel (out, in/g, k...) as the ConvTranspose kernel (in, out/g, k...)
    of the same channel map, and back: each group's (out, in) block transposed."""
    a, b, ks = w.shape[0], w.shape[1], w.shape[2:]
    return np.swapaxes(w.reshape((group, a // group, b) + ks), 1, 2).reshape((group * b, a // group) + ks)


def check_transposable(fact) -> None:
    """NotApplicable unless `fact` emits as 1x1 Convs around one plain spatial stage, the
    form a ConvTranspose layer keeps (formats with several spatial stages, folded batches or
    stacked pieces are left alone there)."""
    from ..errors import NotApplicable

    parts = fact.groups if isinstance(fact, GroupedConvFactorization) else [fact]
    for part in parts:
        spatial = [s for s in getattr(part, "stages", []) if s.spatial]
        if (not isinstance(part, ConvFactorization) or type(part).emit is not ConvFactorization.emit
                or len(spatial) != 1 or spatial[0].attrs is not None):
            raise NotApplicable(f"{fact.format}: this factorised form has no ConvTranspose equivalent "
                                "(svd, tucker, tt, cp and ht do)")


def pointwise(matrix: np.ndarray, spatial_rank: int):
    """A (out, in) matrix as a 1x1(x1) conv weight."""
    return matrix.reshape(matrix.shape + (1,) * spatial_rank)


def svd(a: np.ndarray, compute_uv: bool = True):
    """The thin SVD of `a` (np.linalg.svd), falling back to LAPACK's QR-iteration driver
    (gesvd) where the divide-and-conquer one numpy calls (gesdd) does not converge: it fails
    on rare well-conditioned matrices (a residual unfolding of a random 256-channel 3x3
    kernel, tests/test_formats_svd_fallback.py)."""
    try:
        return np.linalg.svd(a, full_matrices=False, compute_uv=compute_uv)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(a, full_matrices=False, compute_uv=compute_uv, lapack_driver="gesvd")


def gram_left_singular(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, s), largest first, from the eigenvectors of the Gram matrix of `a`'s rows: the
    left singular vectors and values without V, for short wide matrices (singular values
    under ~1e-8 of the largest lose accuracy: the Gram squares them)."""
    evals, evecs = np.linalg.eigh(a @ a.T)
    return evecs[:, ::-1], np.sqrt(np.clip(evals[::-1], 0.0, None))


def left_singular(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, s) of the thin SVD of `a`. A wide matrix (4x more columns than rows) takes them
    from gram_left_singular (some 10x faster on a 64 x 262144 unfolding); where the Gram's
    smallest eigenvalue is under 1e-10 of its largest, squaring would blur the small
    singular values that rank decisions read, and the SVD is taken instead."""
    rows, cols = a.shape
    if cols > 4 * rows:
        u, s = gram_left_singular(a)
        if s[-1] ** 2 > 1e-10 * s[0] ** 2:
            return u, s
    return svd(a)[:2]


def mode_project(tensor: np.ndarray, factors: dict) -> np.ndarray:
    """tensor x_k factors[k]^T for each mode k given, axes kept in place: each mode product is
    a batched matrix product on a reshaped view (no transposed copy of the tensor, as
    tensordot would make), the most shrinking ones first."""
    for k in sorted(factors, key=lambda k: factors[k].shape[1] / tensor.shape[k]):
        u, shape = factors[k], tensor.shape
        a, n = math.prod(shape[:k]), shape[k]
        tensor = np.matmul(u.T, tensor.reshape(a, n, -1)).reshape(shape[:k] + (u.shape[1],) + shape[k + 1:])
    return tensor


def truncation_rank(s: np.ndarray, *, cap: int | None = None, delta: float = 0.0) -> int:
    """Smallest rank whose discarded singular values have energy <= delta^2 (delta = 0:
    the numerical rank), then capped at `cap`; at least 1."""
    if s.size == 0:
        return 1
    if delta > 0:
        tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} s_i^2
        r = int(np.argmax(tail <= delta**2))
    else:
        r = int(np.count_nonzero(s > s[0] * 1e-13))
    if cap is not None:
        r = min(r, cap)
    return max(1, r)


def permute(t, perm):
    """Axis permutation for numpy arrays and torch tensors alike."""
    return t.permute(*perm) if hasattr(t, "permute") else np.transpose(t, perm)


def merge_train(cores: list):
    """Contract a train of 3-way cores (r0, n_i, r1) into (r0, prod n_i, r_last)."""
    out = cores[0]
    for core in cores[1:]:
        r0, n, r = out.shape
        out = (out.reshape(r0 * n, r) @ core.reshape(r, -1)).reshape(r0, n * core.shape[1], core.shape[2])
    return out


@dataclass
class GroupedConvFactorization(Factorization):
    """A grouped conv (group g > 1) factorised group by group: its input channels are
    sliced into g parts, each part goes through its own factorised conv, the outputs are
    concatenated."""

    format: str
    groups: list[ConvFactorization]

    @property
    def cores(self) -> dict[str, np.ndarray]:
        return {f"g{i}.{k}": v for i, g in enumerate(self.groups) for k, v in g.cores.items()}

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.groups[0].ranks

    @property
    def linear(self) -> bool:
        return all(g.linear for g in self.groups)

    def params(self) -> int:
        return sum(g.params() for g in self.groups)

    def to_dense(self) -> np.ndarray:
        """The grouped kernel, T x S/g x k, as ONNX stores it."""
        return np.concatenate([g.to_dense() for g in self.groups], axis=0)

    def macs(self, geometry: ConvGeometry) -> int:
        return sum(g.macs(geometry) for g in self.groups)

    def emit(self, builder: Builder, x: str, geometry: ConvGeometry, bias: np.ndarray | None, output: str) -> str:
        per_in, per_out = self.groups[0].channels[1], self.groups[0].channels[0]
        outs = []
        for i, group in enumerate(self.groups):
            part = builder.op("Slice", [x, builder.int64s([i * per_in]), builder.int64s([(i + 1) * per_in]),
                                        builder.int64s([1])], "group")
            part_bias = None if bias is None else bias[i * per_out:(i + 1) * per_out]
            outs.append(group.emit(builder, part, geometry, part_bias, builder.fresh("group_out")))
        return builder.op("Concat", outs, "concat", output=output, axis=1)

    def torch_module(self, geometry: ConvGeometry, bias: np.ndarray | None = None):
        from ..nn.modules import GroupedConv

        per_out = self.groups[0].channels[0]
        return GroupedConv([g.torch_module(geometry, None if bias is None else bias[i * per_out:(i + 1) * per_out])
                            for i, g in enumerate(self.groups)])
