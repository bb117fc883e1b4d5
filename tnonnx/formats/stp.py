"""Semi-tensor-product (STP) variants: what stt, str and sttu share (dense layers here,
convolutions in stp_conv.py).

Zhao et al. 2021, ALGORITHMS.md section 6. A factor F stored at (I/t) x (R/t) acts as
F (x) I_t: every stored factor or core is t times smaller on its two expanding
dimensions (about t^2 fewer parameters). The paper's placement of the identity is not
confirmed; this is the operational definition used here (t = `stp_t`, default 2):

- Dense STT / STR. Each mode splits as n_k = n'_k t, m_k = m'_k t, with the index
  i_k = i'_k t + s_k. Core k is stored as G'_k (r_{k-1}, n'_k, m'_k, r_k) and acts as
  G'_k (x) I_t on (n_k, m_k): the sub-index s_k passes from input to output unchanged.
  In the chain engine s_k is a label held by the input and the output and by no core,
  so the layer is an ordinary chain (MatMuls on reshaped activations) and the Kronecker
  product is never built. The weights of this form make a linear subspace of dimension
  size(W) / t^(2d); its least squares projection averages the diagonal sub-indices,
  W'[i', j'] = mean_s W[(i', s), (j', s)] per mode, and the reduced W' (N/t^d x M/t^d)
  goes to the base format (TT-SVD, TR). By Pythagoras the squared error is the
  projection error squared plus the decomposition error squared; both are kept on the
  result (`projection_error`, `decomposition_error`, relative to ||W||), and a --tol is
  split accordingly: the base gets what the projection left of the budget.
- Convolutions: see stp_conv.py (K = K' (x) I_t on the channels). sttu: see sttu.py.

A shape that admits no such tensorization, a --tol below the projection error and a
--ratio out of reach raise `STPNotApplicable` (a TnonnxError, ValueError): the layer is
to be left alone, the message being the reason.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np

from ..emit import Chain, best_order
from ..errors import NotApplicable
from ..tensorize import choose_modes, default_order
from .base import ChainFactorization, RankSpec


class STPNotApplicable(NotApplicable, ValueError):
    """This layer cannot take the STP format (shape, tolerance or ratio): leave it alone."""


# ------------------------------------------------------------------ dense


def stp_modes(n: int, m: int, t: int, *, modes=None, order: int | None = None, default: int | None = None):
    """In- and out-modes (full sizes), every one divisible by t. Without --modes or
    --order, the number of modes d falls from the default until t^d divides n and m."""
    if modes:
        ins, outs = tuple(modes[0]), tuple(modes[1])
        if any(v % t for v in ins + outs):
            raise STPNotApplicable(f"modes {ins},{outs}: every mode must be divisible by stp_t={t}")
        return ins, outs
    for d in [order] if order else range(default or default_order(n, m), 0, -1):
        if n % t**d == 0 and m % t**d == 0:
            ins, outs = choose_modes(n // t**d, m // t**d, d)
            return tuple(v * t for v in ins), tuple(v * t for v in outs)
    need = f"t^{order}" if order else "t"
    raise STPNotApplicable(f"{n}x{m} weight: STP with stp_t={t} needs {need} to divide both dimensions")


def _letters(count: int, start: int = 0) -> list[str]:
    return list(string.ascii_letters[start:start + count])


def project_dense(weight: np.ndarray, ins, outs, t: int) -> np.ndarray:
    """W' (N/t^d x M/t^d): the mean over the diagonal sub-indices of every mode pair."""
    d = len(ins)
    a, b, s = _letters(d), _letters(d, d), _letters(d, 2 * d)
    shape = [v for n in ins + outs for v in (n // t, t)]
    eq = "".join(x + y for x, y in zip(a, s)) + "".join(x + y for x, y in zip(b, s)) + "->" + "".join(a + b)
    reduced = np.einsum(eq, weight.reshape(shape)) / t**d
    return reduced.reshape(math.prod(ins) // t**d, -1)


def embed_dense(reduced: np.ndarray, ins, outs, t: int) -> np.ndarray:
    """The full N x M weight of W' acting through I_t on every mode pair."""
    d = len(ins)
    a, b, s, z = (_letters(d, k * d) for k in range(4))
    eye = np.eye(t)
    operands = [reduced.reshape([v // t for v in ins + outs]), a + b]
    for k in range(d):
        operands += [eye, [s[k], z[k]]]
    out = [x for pair in zip(a, s) for x in pair] + [x for pair in zip(b, z) for x in pair]
    ids = {c: i for i, c in enumerate(a + b + s + z)}
    operands = [op if i % 2 == 0 else [ids[c] for c in op] for i, op in enumerate(operands)]
    return np.einsum(*operands, [ids[c] for c in out]).reshape(math.prod(ins), math.prod(outs))


@dataclass
class STPChain(ChainFactorization):
    """A chain in which labels held by both the input and the output (the sub-indices
    s_k) ride through every core unchanged."""

    t: int = 1
    projection_error: float = 0.0  # relative to ||W||
    decomposition_error: float = 0.0

    def to_dense(self) -> np.ndarray:
        chain = self.chain
        ids = {label: i for i, label in enumerate(chain.sizes)}
        through = [l for l in chain.in_labels if l in chain.out_labels]
        twin = {l: len(ids) + j for j, l in enumerate(through)}
        operands = [x for core in chain.steps for x in (self.cores[core.key], [ids[l] for l in core.labels])]
        operands += [x for l in through for x in (np.eye(chain.sizes[l]), [ids[l], twin[l]])]
        out = [ids[l] for l in chain.in_labels] + [twin.get(l, ids[l]) for l in chain.out_labels]
        return np.einsum(*operands, out, optimize="greedy").reshape(chain.in_features, chain.out_features)


def stp_chain(base: Chain, t: int) -> Chain:
    """The base chain with a sub-index label of size t after every in- and out-mode."""
    if len(base.in_labels) != len(base.out_labels):
        raise ValueError("STP needs as many in-modes as out-modes")
    s = [f"stp{k}" for k in range(len(base.in_labels))]
    ins = tuple(x for l, sk in zip(base.in_labels, s) for x in (l, sk))
    outs = tuple(x for l, sk in zip(base.out_labels, s) for x in (l, sk))
    sizes = dict(base.sizes) | {sk: t for sk in s}
    return Chain(ins, outs, sizes, best_order(list(base.steps), ins, outs, sizes), base.activation)


def reduced_spec(spec: RankSpec, projection: float, norm: float, reduced_norm: float, shrink: int) -> RankSpec:
    """The rank rule for the reduced weight W': `reduced_norm` is the norm of its embedding
    (||W'|| t^(d/2)), `shrink` = size(W) / size(W'). A tolerance keeps what the projection
    left of the error budget (Pythagoras); a ratio is shared out by `shrink`."""
    if spec.tol is not None:
        budget2 = (spec.tol * norm) ** 2 - projection**2
        if budget2 < 0:
            raise STPNotApplicable(f"the STP structure alone loses {projection / norm:.3g} of the weight "
                                   f"(relative), more than the tolerance {spec.tol:g}")
        return RankSpec(tol=min(math.sqrt(budget2) / max(reduced_norm, 1e-300), 0.999))
    if spec.ratio is not None:
        return RankSpec(ratio=spec.ratio / shrink)
    return spec


def _check_ratio(fact, size: int, spec: RankSpec) -> None:
    if spec.ratio is not None and fact.params() * spec.ratio > size:
        raise STPNotApplicable(f"ratio {spec.ratio:g}x out of reach: {fact.format} needs {fact.params()} parameters "
                               f"at its lowest ranks, the layer has {size}")


def fit_dense_stp(name: str, base_fit, weight: np.ndarray, spec: RankSpec, *, t: int, modes=None,
                  order: int | None = None, **options) -> STPChain:
    """Project W on the STP subspace, fit W' with `base_fit` (a format's fit_dense)."""
    weight = np.asarray(weight, dtype=np.float64)
    n, m = weight.shape
    ins, outs = stp_modes(n, m, t, modes=modes, order=order)
    d = len(ins)
    reduced = project_dense(weight, ins, outs, t)
    norm = float(np.linalg.norm(weight))
    projection = float(np.linalg.norm(weight - embed_dense(reduced, ins, outs, t)))
    scale = t ** (d / 2)  # ||embed(X)|| = t^(d/2) ||X||
    rspec = reduced_spec(spec, projection, norm, scale * np.linalg.norm(reduced), t ** (2 * d))
    base = base_fit(reduced, rspec, modes=(tuple(v // t for v in ins), tuple(v // t for v in outs)), **options)
    fact = STPChain(name, stp_chain(base.chain, t), base.cores, base.ranks, modes=(ins, outs), t=t)
    fact.projection_error = projection / max(norm, 1e-300)
    fact.decomposition_error = scale * float(np.linalg.norm(reduced - base.to_dense())) / max(norm, 1e-300)
    _check_ratio(fact, weight.size, spec)
    return fact
