"""Hierarchical Tucker (HT): a binary dimension tree of frames and transfer tensors.

Dense: the d mode pairs (n_k, m_k) of the tensorized weight are the leaves of a balanced
tree. Leaf k stores its frame U_k (n_k, m_k, u_k), an inner node t with children l, r a
transfer tensor B_t (r_l, r_r, r_t); the root (r_t = 1, dropped) is stored multiplied into
one child when that is smaller (it saves r^2: at d = 2 HT stores what TT does). The
forward pass is the engine's cheapest absorption order over this network.

Fitting: hierarchical SVD (Grasedyck 2010), leaves to root: in post-order, each node's
frame is the leading left singular vectors of the matricisation, over its modes, of the
tensor already projected onto the frames before it (so B_t = (U_l (x) U_r)^T U_t comes out
directly); the root's two children share the last SVD. The projections commute, so the
error is exactly the root of the sum of the 2d-3 discarded tails: --tol eps truncates
each at eps ||W|| / sqrt(2d-3) and guarantees ||W - W_ht|| <= eps ||W||. --rank caps every
node; --ratio takes the largest uniform cap whose stored parameters fit. A node whose
rank reaches r_l r_r (a leaf: n_k m_k) is kept whole: identity frame, not stored, its
parent's tensor carries its children's bonds.

Conv: the kernel tensorized as (far channel modes, kernel, near channel modes) on the tree
root(far side, c(kernel leaf, near side)), the near side being the smaller of T and S
(measured: better at low compression on PP-OCR kernels, equal elsewhere). Three convs:
the S-side subtree is a 1x1 conv out of S, the kernel leaf with B_c one k-sized conv with
the original stride/pads/dilations, the T-side subtree a 1x1 conv into T; the root goes
with the far side. Each stage stores its cores or its merged weight, whichever is smaller
(cores are merged in-graph by MatMuls over initializers, folded by ONNX Runtime at load).
See ALGORITHMS.md section 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..emit import Chain, Core, best_order
from ..errors import TnonnxError
from ..tensorize import choose_modes
from .base import ChainFactorization, RankSpec, left_singular, svd, truncation_rank
from .network_conv import NetworkConvFactorization, contract, network_stage
from .tt import channel_modes

NAME = "ht"


@dataclass(frozen=True)
class Node:
    """The tensor modes lo..hi-1 (contiguous); an internal node has two children."""

    lo: int
    hi: int
    children: tuple = ()


def balanced(lo: int, hi: int) -> Node:
    if hi - lo == 1:
        return Node(lo, hi)
    mid = lo + (hi - lo + 1) // 2
    return Node(lo, hi, (balanced(lo, mid), balanced(mid, hi)))


def preorder(node: Node):
    yield node
    for child in node.children:
        yield from preorder(child)


def postorder(node: Node):
    for child in node.children:
        yield from postorder(child)
    yield node


# ---------------------------------------------------------------------- hierarchical SVD


@dataclass
class Fit:
    rank: dict  # node -> rank (the root left out)
    sat: dict  # node -> kept whole (identity frame in its children's bonds)
    frames: dict  # node -> frame in its children's bonds: (n_k m_k, r) or (r_l r_r, r)
    root: np.ndarray | None  # (R_l, R_r) root transfer matrix


def hsvd(tensor, root: Node, *, cap: int | None = None, delta: float = 0.0) -> Fit:
    """Leaves-to-root hierarchical SVD, each node truncated on the tensor already projected
    onto the frames before it (post-order); the root's children share the last SVD.

    Every projection lies inside the ones before it on the same modes, so they commute and
    the error splits orthogonally: ||W - W_ht||^2 = sum of the 2d-3 discarded tails.
    `tensor` may be a shape only (a dry run: generic ranks min(cap, rows, cols)).
    """
    dry = isinstance(tensor, tuple)
    x = None if dry else tensor
    shape = list(tensor if dry else tensor.shape)
    frontier = [n for n in postorder(root) if not n.children]
    fit = Fit({}, {}, {}, None)
    left, right = root.children

    def split(i, j, left_only=False):
        """Matricise over frontier axes i..j-1; (u, s, vt) (vt None with `left_only`) or
        generic singular values."""
        rows = math.prod(shape[i:j])
        cols = math.prod(shape) // rows
        if dry:
            return None, np.ones(min(rows, cols)), None
        mat = x.reshape(math.prod(shape[:i]), rows, -1).transpose(1, 0, 2).reshape(rows, -1)
        return (*left_singular(mat), None) if left_only else svd(mat)

    for node in postorder(root):
        if node in (root, left, right):
            continue
        if node.children:  # merge the children's axes
            i = frontier.index(node.children[0])
            shape[i: i + 2] = [shape[i] * shape[i + 1]]
            frontier[i: i + 2] = [node]
        i = frontier.index(node)
        u, s, _ = split(i, i + 1, left_only=True)
        r = truncation_rank(s, cap=cap, delta=delta)
        fit.sat[node], fit.rank[node] = r >= shape[i], min(r, shape[i])
        if not fit.sat[node]:
            if not dry:
                fit.frames[node] = u[:, :r]
                moved = np.moveaxis(x.reshape(shape), i, 0).reshape(shape[i], -1)
                x = np.moveaxis((u[:, :r].T @ moved).reshape([r] + shape[:i] + shape[i + 1:]), 0, i)
            shape[i] = r
    # the root: frontier = left's axes, then right's
    k = sum(1 for n in frontier if n.hi <= left.hi)
    u, s, vt = split(0, k)
    r = truncation_rank(s, cap=cap, delta=delta)
    sides = []
    for node, basis, size in ((left, u, math.prod(shape[:k])), (right, None if dry else vt.T, math.prod(shape[k:]))):
        fit.sat[node], fit.rank[node] = r >= size, min(r, size)
        if not dry and not fit.sat[node]:
            fit.frames[node] = basis[:, :r]
        sides.append(None if dry else (np.eye(size) if fit.sat[node] else basis[:, :r]))
    if not dry:
        fit.root = sides[0].T @ x.reshape(sides[0].shape[0], -1) @ sides[1]
    return fit


# ---------------------------------------------------------------------- the network


@dataclass
class Network:
    """Which cores are stored and their labels. Leaf k's modes carry the labels of
    leaf_labels[k] (label -> size, C order); node bonds are u<k> (leaves), h<lo>_<hi>."""

    root: Node
    rank: dict
    sat: dict
    keep: frozenset  # nodes stored even when saturated
    leaf_labels: list
    targets: tuple = ()  # root children the root tensor may be merged into
    sizes: dict = field(default_factory=dict)  # label -> size, bonds included
    labels: dict = field(default_factory=dict)  # core key -> labels, stored cores only
    nodes: dict = field(default_factory=dict)  # core key -> node
    bond: dict = field(default_factory=dict)  # node -> labels joining it to its parent
    root_into: str | None = None  # key of the child core holding the root tensor
    merged_labels: tuple = ()  # (that child's labels, the root's labels) before the merge

    def __post_init__(self):
        for leaf in self.leaf_labels:
            self.sizes.update(leaf)
        for node in postorder(self.root):
            if not node.children:
                own, key, legs = f"u{node.lo}", f"U{node.lo}", tuple(self.leaf_labels[node.lo])
            else:
                own, key = f"h{node.lo}_{node.hi}", "B" if node is self.root else f"B{node.lo}_{node.hi}"
                legs = self.bond[node.children[0]] + self.bond[node.children[1]]
            if node is self.root:
                self.labels[key], self.nodes[key] = legs, node
            elif self.sat[node] and node not in self.keep:
                self.bond[node] = legs  # identity frame: not stored, its parent takes the legs
            else:
                self.sizes[own] = self.rank[node]
                self.bond[node] = (own,)
                self.labels[key], self.nodes[key] = legs + (own,), node
        self._merge_root()

    def _merge_root(self):
        """Store the root tensor multiplied into a child's core when that is smaller (it
        saves r^2 when the root's bonds are equal: at d = 2 HT then stores what TT does)."""
        best = None
        for child in self.targets:
            key = next((k for k, n in self.nodes.items() if n == child), None)
            if key is None:
                continue
            (own,) = self.bond[child]
            merged = self.labels[key][:-1] + tuple(l for l in self.labels["B"] if l != own)
            size = math.prod(self.sizes[l] for l in merged)
            if size < self.core_size(key) + self.core_size("B") and (best is None or size < best[0]):
                best = (size, key, merged)
        if best:
            _, key, merged = best
            self.root_into, self.merged_labels = key, (self.labels[key], self.labels.pop("B"))
            self.labels[key] = merged
            del self.nodes["B"]

    def core_size(self, key: str) -> int:
        return math.prod(self.sizes[l] for l in self.labels[key])

    def keys_under(self, node: Node) -> list[str]:
        """Stored cores of a subtree, parents first (each shares a bond with one before)."""
        where = {n: k for k, n in self.nodes.items()}
        return [where[n] for n in preorder(node) if n in where]

    def ranks(self) -> tuple[int, ...]:
        """Node ranks in post-order (leaves and inner nodes, the root left out)."""
        return tuple(self.rank[n] for n in postorder(self.root) if n is not self.root)


def build_cores(net: Network, fit: Fit) -> dict[str, np.ndarray]:
    """The stored frames and transfer tensors, shaped by their labels."""
    cores = {}
    for key, node in net.nodes.items():
        shape = [net.sizes[l] for l in (net.merged_labels[0] if key == net.root_into else net.labels[key])]
        if node is net.root:
            cores[key] = fit.root.reshape(shape)
        elif net.sat[node]:  # kept although saturated: the identity on its children's bonds
            cores[key] = np.eye(net.rank[node]).reshape(shape)
        else:
            cores[key] = fit.frames[node].reshape(shape)
    if net.root_into:
        child, root = net.merged_labels
        root_core = fit.root.reshape([net.sizes[l] for l in root])
        cores[net.root_into] = contract([cores[net.root_into], root_core], [child, root], net.labels[net.root_into])
    return cores


def fit_network(tensor: np.ndarray, root: Node, leaf_labels: list, spec: RankSpec, stored_params,
                keep=frozenset(), targets=None) -> tuple[Network, dict]:
    """Ranks by the spec, then the cores; `stored_params(net)` counts what will be stored."""
    tensor = np.asarray(tensor, dtype=np.float64)
    targets = root.children if targets is None else targets
    network = lambda fit: Network(root, fit.rank, fit.sat, frozenset(keep), leaf_labels, targets)
    if spec.tol is not None:  # 2d - 3 SVDs (the root's children share one)
        fit = hsvd(tensor, root, delta=spec.tol * np.linalg.norm(tensor) / math.sqrt(2 * tensor.ndim - 3))
    elif spec.ratio is not None:
        fit = ratio_fit(tensor, root, spec.ratio, lambda f: stored_params(network(f)))
    else:
        fit = hsvd(tensor, root, cap=spec.rank)
    net = network(fit)
    return net, build_cores(net, fit)


def ratio_fit(tensor: np.ndarray, root: Node, ratio: float, stored_params) -> Fit:
    """The largest uniform cap whose stored parameters fit tensor.size / ratio. Searched on
    generic ranks (a dry run, an upper bound of the fitted ranks), then lowered if the fit
    stores more (a rank-deficient weight that leaves a node unsaturated)."""
    budget, cap = tensor.size / ratio, 1
    for c in range(1, math.isqrt(tensor.size) + 1):  # no matricisation has a larger rank
        fit = hsvd(tensor.shape, root, cap=c)
        if stored_params(fit) <= budget:
            cap = c
        if max(fit.rank.values()) < c:  # every node saturated: larger caps change nothing
            break
    fit = hsvd(tensor, root, cap=cap)
    while cap > 1 and stored_params(fit) > budget:
        cap -= 1
        fit = hsvd(tensor, root, cap=cap)
    return fit


# ---------------------------------------------------------------------- dense


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, **_) -> ChainFactorization:
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order)
    d = len(ins)
    if d < 2:
        raise TnonnxError("ht needs at least 2 modes per side (--order >= 2)")
    t = np.asarray(weight, dtype=np.float64).reshape(tuple(ins) + tuple(outs))
    t = t.transpose([i for k in range(d) for i in (k, d + k)]).reshape([ins[k] * outs[k] for k in range(d)])
    leaf_labels = [{f"n{k}": ins[k], f"m{k}": outs[k]} for k in range(d)]
    net, cores = fit_network(t, balanced(0, d), leaf_labels, spec,
                             lambda net: sum(net.core_size(k) for k in net.labels))
    network = [Core(key, labels) for key, labels in net.labels.items()]
    in_labels, out_labels = tuple(f"n{k}" for k in range(d)), tuple(f"m{k}" for k in range(d))
    chain = Chain(in_labels, out_labels, net.sizes, best_order(network, in_labels, out_labels, net.sizes))
    return ChainFactorization(NAME, chain, cores, net.ranks(), modes=(tuple(ins), tuple(outs)))


# ---------------------------------------------------------------------- conv


def _stages(net: Network, near_is_input: bool, t: int, s: int, ks: tuple) -> list:
    """(core keys, weight labels, weight shape, spatial) of the conv stages, input first;
    a side kept whole (no stored core) needs no stage."""
    far, c = net.root.children
    kk, near = c.children
    modes = lambda node: tuple(l for leaf in net.leaf_labels[node.lo: node.hi] for l in leaf)
    (bc,), bn = net.bond[c], net.bond[near]
    rc, rn, one = net.sizes[bc], math.prod(net.sizes[l] for l in bn), (1,) * len(ks)
    far_keys = tuple([k for k in ("B",) if k in net.labels] + net.keys_under(far))
    near_keys, spatial_keys = tuple(net.keys_under(near)), (f"B{c.lo}_{c.hi}",) + tuple(net.keys_under(kk))
    if near_is_input:  # S -> r_near, r_near -> r_c (k), r_c -> T
        stages = [(near_keys, bn + modes(near), (rn, s) + one, False),
                  (spatial_keys, (bc,) + bn + ("k",), (rc, rn) + ks, True),
                  (far_keys, modes(far) + (bc,), (t, rc) + one, False)]
    else:  # S -> r_c, r_c -> r_near (k), r_near -> T
        stages = [(far_keys, (bc,) + modes(far), (rc, s) + one, False),
                  (spatial_keys, bn + (bc,) + ("k",), (rn, rc) + ks, True),
                  (near_keys, modes(near) + bn, (t, rn) + one, False)]
    return [stage for stage in stages if stage[0]]


def fit_conv(kernel: np.ndarray, spec: RankSpec, **_) -> NetworkConvFactorization:
    t, s = kernel.shape[:2]
    ks = tuple(kernel.shape[2:])
    k = math.prod(ks)
    near_is_input = s <= t  # the kernel leaf joins the smaller channel side
    far, near = (channel_modes(t), channel_modes(s)) if near_is_input else (channel_modes(s), channel_modes(t))
    kernel = np.asarray(kernel, dtype=np.float64).reshape(t, s, k)
    tensor = kernel.transpose((0, 2, 1) if near_is_input else (1, 2, 0)).reshape(far + (k,) + near)
    names = ("t", "s") if near_is_input else ("s", "t")
    a, b = len(far), len(near)
    c = Node(a, a + 1 + b, (Node(a, a + 1), balanced(a + 1, a + 1 + b)))
    root = Node(0, a + 1 + b, (balanced(0, a), c))
    leaf_labels = ([{f"{names[0]}{i}": n} for i, n in enumerate(far)] + [{"k": k}]
                   + [{f"{names[1]}{j}": n} for j, n in enumerate(near)])

    def stored(net):  # per stage: its cores or its merged weight, whichever is smaller
        return sum(min(math.prod(shape), sum(net.core_size(key) for key in keys))
                   for keys, _, shape, _ in _stages(net, near_is_input, t, s, ks))

    # B_c is stored even when saturated: it is the spatial conv's weight
    net, cores = fit_network(tensor, root, leaf_labels, spec, stored, keep=frozenset([c]), targets=(root.children[0],))
    stages = [network_stage(keys, net.labels, out, shape, spatial)
              for keys, out, shape, spatial in _stages(net, near_is_input, t, s, ks)]
    return NetworkConvFactorization(NAME, stages, cores, net.ranks(), kernel=ks, channels=(t, s))
