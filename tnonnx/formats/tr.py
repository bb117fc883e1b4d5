"""Tensor ring (ALGORITHMS.md section 3): TR-matrix for dense layers, the TRN layout for
convolutions. The cores are fitted by tr_fit.fit_ring (TR-SVD and TR-ALS, see there for
how --rank, --tol and --ratio map to ring ranks).

Dense: cores (r_k, n_k, m_k, r_{k+1}) over the mode pairs (n_k m_k) of the tensorized
weight, r_d = r_0: the first and last cores share the ring label, the contraction engine
(emit.best_order) carries it open until the last of them is absorbed.

Conv: a ring over (s_1..s_b, kernel, t_1..t_a), closed by r0 between t_a and s_1, run as
three Convs with the ring bond riding along the batch axis (RingConvFactorization).
"""

from __future__ import annotations

import math

import numpy as np

from ..emit import Chain, Core, best_order, conv_node
from ..tensorize import choose_modes
from .base import (ChainFactorization, ConvFactorization, ConvStage, RankSpec, conv_output_size, merge_train,
                   permute, pointwise)
from .tr_fit import ALS_SWEEPS, fit_ring
from .tt import channel_modes

NAME = "tr"
SLOW_FIT = True  # ALS sweeps: the planner fits it only where its proxy came near the front
PROXY = "tt"  # a train with the same caps: a ring is a train with one more bond


# ------------------------------------------------------------------ dense layers


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, sweeps: int = ALS_SWEEPS,
              **_) -> ChainFactorization:
    """TR-matrix: cores (r_k, n_k, m_k, r_{k+1}), the first and last sharing the ring label r0."""
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order)
    d = len(ins)
    t = weight.reshape(tuple(ins) + tuple(outs)).transpose([i for k in range(d) for i in (k, d + k)])
    cores3 = fit_ring(t.reshape([ins[k] * outs[k] for k in range(d)]), spec, sweeps)
    ranks = tuple(c.shape[0] for c in cores3)
    sizes = {f"n{k}": ins[k] for k in range(d)} | {f"m{k}": outs[k] for k in range(d)}
    sizes |= {f"r{k}": ranks[k] for k in range(d)}
    cores, network = {}, []
    for k, c in enumerate(cores3):
        if d == 1:  # a ring of one core is a plain matrix (ring rank 1)
            cores["G0"], labels = c.reshape(ins[0], outs[0]), ("n0", "m0")
        else:
            cores[f"G{k}"] = c.reshape(c.shape[0], ins[k], outs[k], c.shape[2])
            labels = (f"r{k}", f"n{k}", f"m{k}", f"r{(k + 1) % d}")
        network.append(Core(f"G{k}", labels))
    in_labels, out_labels = tuple(f"n{k}" for k in range(d)), tuple(f"m{k}" for k in range(d))
    chain = Chain(in_labels, out_labels, sizes, best_order(network, in_labels, out_labels, sizes))
    return ChainFactorization(NAME, chain, cores, ranks, modes=(tuple(ins), tuple(outs)))


# ------------------------------------------------------------------ convolutions (TRN layout)


class RingConvFactorization(ConvFactorization):
    """Three Convs: a 1x1 conv S -> r0 r_m (the merged input cores), the batch folded with
    the ring bond (B, r0 r_m, ...) -> (B r0, r_m, ...), the k-sized conv r_m -> r_{m+1} with
    the layer's stride/pads/dilations, unfolded back to (B, r0 r_{m+1}, ...), and a 1x1 conv
    r0 r_{m+1} -> T (the merged output cores contracted over both bonds) with the bias."""

    @property
    def bonds(self) -> tuple[int, int, int]:
        w_in, w_sp, _ = self.stage_weights()
        return w_in.shape[0] // w_sp.shape[1], w_sp.shape[1], w_sp.shape[0]  # r0, r_m, r_{m+1}

    def to_dense(self) -> np.ndarray:
        w_in, w_sp, w_out = self.stage_weights()
        r0, rm, rn = self.bonds
        t, s = self.channels
        return np.einsum("tac,cb...,abs->ts...", w_out.reshape(t, r0, rn), w_sp, w_in.reshape(r0, rm, s),
                         optimize=True)

    def macs(self, geometry) -> int:
        size, total = tuple(geometry.in_spatial), 0
        for w, stage, fold in zip(self.stage_weights(), self.stages, (1, self.bonds[0], 1)):
            size = conv_output_size(size, tuple(w.shape[2:]), stage.conv_attrs(geometry))
            total += fold * math.prod(size) * math.prod(w.shape)
        return total

    # how the merged train (r_first, channels, r_last) of stages 0 and 2 is permuted into the weight
    MERGE_PERMS = {0: (0, 2, 1), 2: (1, 2, 0)}

    def emit(self, builder, x, geometry, bias, output):
        r0, rm, rn = self.bonds
        nsp = len(self.kernel)
        for i, (w, stage) in enumerate(zip(self.stage_weights(), self.stages)):
            if stage.train and self._stored_size(stage, w) < w.size:  # merge in-graph (folded at load)
                first, last = self.cores[stage.train[0]], self.cores[stage.train[-1]]
                merged = self._merge_in_graph(builder, stage.train, (first.shape[0], -1, last.shape[2]))
                merged = builder.op("Transpose", [merged], "merge", perm=list(self.MERGE_PERMS[i]))
                w = builder.op("Reshape", [merged, builder.int64s(list(w.shape))], "merge")
            if i == 1:  # (B, r0 r_m, ...) -> (B r0, r_m, ...)
                x = builder.op("Reshape", [x, builder.int64s([-1, rm] + [0] * nsp)], "fold")
            x = conv_node(builder, x, w, "conv", bias=bias if i == 2 else None, attrs=stage.conv_attrs(geometry),
                          output=output if i == 2 else None)
            if i == 1:  # (B r0, r_{m+1}, ...) -> (B, r0 r_{m+1}, ...)
                x = builder.op("Reshape", [x, builder.int64s([-1, r0 * rn] + [0] * nsp)], "unfold")
        return x

    def torch_module(self, geometry, bias: np.ndarray | None = None):
        from .tr_torch import RingConv

        return RingConv(self, geometry, bias)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, sweeps: int = ALS_SWEEPS, **_) -> RingConvFactorization:
    """A ring over (s_1..s_b, kernel, t_1..t_a); the bond closing it (t_a -> s_1) is r0."""
    t, s = kernel.shape[:2]
    ks = kernel.shape[2:]
    tm, sm = channel_modes(t), channel_modes(s)
    b, nsp = len(sm), len(ks)
    tensor = kernel.reshape(t, s, -1).transpose(1, 2, 0).reshape(sm + (math.prod(ks),) + tm)
    cores3 = fit_ring(tensor, spec, sweeps)
    cores = {f"G{i}": c for i, c in enumerate(cores3)}
    in_keys, mid, out_keys = tuple(cores)[:b], f"G{b}", tuple(cores)[b + 1:]

    def input_stage(c):  # merged (r0, S, r_m) -> (r0 r_m, S)
        g = merge_train([c[k] for k in in_keys])
        return pointwise(permute(g, (0, 2, 1)).reshape(g.shape[0] * g.shape[2], s), nsp)

    def spatial_stage(c):  # (r_m, k, r_{m+1}) -> conv r_m -> r_{m+1}
        g = c[mid]
        return permute(g, (2, 0, 1)).reshape((g.shape[2], g.shape[0]) + ks)

    def output_stage(c):  # merged (r_{m+1}, T, r0) -> (T, r0 r_{m+1})
        g = merge_train([c[k] for k in out_keys])
        return pointwise(permute(g, (1, 2, 0)).reshape(t, g.shape[2] * g.shape[0]), nsp)

    stages = [ConvStage(input_stage, False, in_keys), ConvStage(spatial_stage, True),
              ConvStage(output_stage, False, out_keys)]
    ranks = tuple(c.shape[0] for c in cores3)
    return RingConvFactorization(NAME, stages, cores, ranks, kernel=ks, channels=(t, s))
