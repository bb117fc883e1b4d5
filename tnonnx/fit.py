"""Data-aware fitting (ALGORITHMS.md section 11): fit each layer to what it computes on
calibration data instead of to its weight.

A dense layer's calibration inputs X~ (rows of its last axis) enter a linear fit only
through their Gram matrix G = X~^T X~ = L L^T (Cholesky, with a small ridge so that input
directions the data never uses do not make it singular). With the *basis* A = L^T (N x N),
||X~ V||_F = ||A V||_F for every V, so the output error of a candidate W~ is
||A W~ - B||_F with the *target* B = A W: N rows instead of the whole data set. Sequential
fitting feeds the layer the outputs of the already rewritten layers (X~) while asking for
the original layer's outputs (X W): then B = L^{-1} C W with the cross Gram C = X~^T X, whose
distance to A W~ differs from ||X~ W~ - X W||_F^2 only by a constant.
Convolutions use the same algebra on their im2col patches (a ConvTranspose's: tnonnx/patches.py).

Every HOLDOUT_EVERY-th calibration sample (activations.py) is kept out of G and enters a
held-out Gram matrix instead: its basis and target measure a candidate's error on samples
its fit did not see (LayerData.held_out_error, what the planner ranks by). Where no planner
judges candidates (a fixed rank rule), svd's closed-form fit then uses all rows
(LayerData.pooled, plan.Fitter's pool_final). A G of fewer rows than features is shrunk
towards the scaled identity first (shrinkage()).

Linear chain formats are refined from their data-free decomposition by L-BFGS on these
rows (their torch modules run the same chain as the ONNX subgraph); convolutions, and the
nonlinear formats, fit to sampled inputs and the original layer's outputs on them.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from .activations import Capture, Probe
from .patches import patches
from .formats.base import ChainFactorization, ConvFactorization, ConvGeometry, svd
from .graph import Layer

# ridge added to the Gram matrix, relative to its mean diagonal: directions the calibration
# data never excites are then fitted as the weight would be, not arbitrarily
RIDGE = 1e-6
REFINE_ITERATIONS = 150


@dataclass
class LayerData:
    """What a data-aware fit knows about one layer (see the module docstring)."""

    kind: str  # "dense" or "conv"
    basis: np.ndarray | None  # A = L^T (N x N, upper triangular; conv: N = S * prod(kernel)), or None
    target: np.ndarray | None  # B (N x M; conv: M = T)
    inputs: np.ndarray | None  # sampled inputs the layer sees: rows (R x N) or maps (B x S x ...)
    given_outputs: np.ndarray | None  # the original layer's outputs for those samples, without bias
    geometry: ConvGeometry | None = None
    held_basis: np.ndarray | None = None  # the same over the held-out calibration samples
    held_target: np.ndarray | None = None
    rows: int = 0  # calibration rows behind the fitted Gram matrix
    shrinkage: float = 0.0  # how far that Gram matrix was shrunk towards the scaled identity
    # outputs computed when first asked for (a picklable partial): closed-form and chain fits
    # never read them, and a 1536-wide layer's 8192 samples cost a second to multiply
    pending_outputs: object = None
    # C (lower triangular, M x M) when the outputs are weighed by S = C C^T (weigh_outputs): the
    # fit then minimises ||A (W~ - W) C|| and target, held_target hold B C
    out_factor: np.ndarray | None = None
    held_rows: int = 0  # calibration rows behind the held-out Gram matrix
    _target_svd: tuple | None = field(default=None, init=False, repr=False, compare=False)  # target_svd()

    @property
    def outputs(self) -> np.ndarray | None:
        if self.given_outputs is None and self.pending_outputs is not None:
            self.given_outputs, self.pending_outputs = self.pending_outputs(), None
        return self.given_outputs

    def target_svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The thin SVD of the target B, computed once (every svd rank the planner tries
        truncates it; see formats/svd.whitened_factors and estimate.svd_estimates)."""
        if self._target_svd is None:
            self._target_svd = svd(self.target)
        return self._target_svd

    def pooled(self) -> "LayerData":
        """The same data over all calibration rows, the held-out ones included: what the final
        fit uses once the candidates have been judged on the held-out rows (Fitter.fit). From
        the two bases alone: A^T A + A_h^T A_h is the pooled Gram matrix (the fitted part keeps
        its shrinkage) and A^T B + A_h^T B_h = (C + C_h) W its cross term (weighed alike)."""
        if self.held_basis is None:
            return self
        import scipy.linalg

        chol = _cholesky(self.basis.T @ self.basis + self.held_basis.T @ self.held_basis)
        moment = self.basis.T @ self.target + self.held_basis.T @ self.held_target
        target = scipy.linalg.solve_triangular(chol, moment, lower=True, check_finite=False)
        return replace(self, basis=chol.T, target=target, held_basis=None, held_target=None,
                       rows=self.rows + self.held_rows, held_rows=0)

    def weigh_outputs(self, moments: np.ndarray) -> None:
        """Measure output errors in the metric of `moments` (M x M, positive semi-definite):
        ||E C|| with C C^T = moments (plus a small ridge) instead of ||E|| (tnonnx/attention.py:
        a query projection's errors as its keys see them)."""
        self.out_factor = _cholesky(moments)
        self.target = self.target @ self.out_factor
        if self.held_target is not None:
            self.held_target = self.held_target @ self.out_factor
        self._target_svd = None

    def unweigh(self, right: np.ndarray) -> np.ndarray:
        """right C^{-1}: the right factor of a fit to the weighed target, mapped back."""
        if self.out_factor is None:
            return right
        import scipy.linalg

        return scipy.linalg.solve_triangular(self.out_factor, right.T, lower=True, trans="T",
                                             check_finite=False).T

    def weighed(self, outputs: np.ndarray) -> np.ndarray:
        return outputs if self.out_factor is None else outputs @ self.out_factor

    @property
    def features(self) -> int:
        return 0 if self.basis is None else self.basis.shape[0]

    def output_error(self, fact, kernel: np.ndarray | None = None) -> float | None:
        """Relative output error on the calibration data: exact (all rows, through the Gram
        basis) for linear factorisations, on the samples for the others. `kernel`: the
        factorisation's to_dense() when the caller has it already."""
        if getattr(fact, "linear", True) and self.basis is not None:
            return _basis_error(fact, self.kind, self.basis, self.target, kernel, self.out_factor)
        if self.inputs is None or not len(self.inputs):
            return None
        return _relative(self.weighed(_evaluate(fact, self)), self.weighed(self.outputs))

    def held_out_error(self, fact, kernel: np.ndarray | None = None) -> float | None:
        """Relative output error on the held-out calibration samples (linear factorisations;
        None without held-out samples)."""
        if self.held_basis is None or not getattr(fact, "linear", True):
            return None
        return _basis_error(fact, self.kind, self.held_basis, self.held_target, kernel, self.out_factor)


def _basis_error(fact, kind: str, basis: np.ndarray, target: np.ndarray, kernel: np.ndarray | None,
                 out_factor: np.ndarray | None = None) -> float:
    """Through the dense kernel, one BLAS product: pushing the N basis rows through a chain's
    cores instead costs 10-40x more (small batched products and layout copies per step;
    a 1536 x 384 TT at cap 8: 0.87 s against 0.05 s)."""
    kernel = fact.to_dense() if kernel is None else kernel
    if kind == "dense":
        return _relative(basis @ (kernel if out_factor is None else kernel @ out_factor), target)
    return _relative(basis @ kernel.reshape(kernel.shape[0], -1).T, target)


def _relative(approx: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(approx - target) / max(np.linalg.norm(target), 1e-300))


def probe_for(layer: Layer) -> Probe | None:
    """What to capture for a layer, or None when data-aware fitting does not apply to it
    (dense layers whose weight acts on the left or on a transposed input; grouped convs;
    a ConvTranspose whose output size comes from auto_pad or output_shape, fitted on its weight)."""
    if layer.kind in ("dense", "recurrent") and layer.side == "right" and not layer.trans_x:
        return Probe("dense")  # recurrent: W acts on the rows of the sequence input
    if layer.kind != "conv" or layer.groups != 1:
        return None
    geometry = layer.geometry
    if not geometry.transposed:
        return Probe("conv", tuple(geometry.kernel), dict(geometry.attrs))
    if geometry.attrs.get("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in geometry.attrs:
        return None
    return Probe("conv-transpose", tuple(geometry.kernel), dict(geometry.attrs))


def layer_data(layer: Layer, capture: Capture, bases: dict | None = None) -> LayerData:
    """The fit data of one layer from the capture of its input. `bases` caches the
    Cholesky factor per capture (layers reading one input share it)."""
    kind = "conv" if layer.kind == "conv" else "dense"
    if kind == "dense":
        matrix = layer.weight  # N x M, y = x W
    else:
        matrix = layer.weight.reshape(layer.weight.shape[0], -1).T  # S*k x T
    basis = target = held_basis = held_target = None
    alpha = shrinkage(capture)
    if capture.gram is not None:
        cache = bases if bases is not None else {}
        if id(capture) not in cache:
            gram, cross = shrink(capture.gram, capture.cross, alpha)
            held = _cholesky(capture.held_gram) if capture.held_gram is not None else None
            cache[id(capture)] = (_cholesky(gram), cross, held)
        chol, cross, held = cache[id(capture)]
        basis, target = _basis_target(chol, cross, matrix)
        if held is not None:
            held_basis, held_target = _basis_target(held, capture.held_cross, matrix)
    inputs, pending = capture.samples, None
    if inputs is not None:
        source = capture.reference if capture.reference is not None else inputs
        pending = functools.partial(_sample_outputs, source, matrix, layer.geometry if kind == "conv" else None)
    return LayerData(kind, basis, target, inputs, None, layer.geometry if kind == "conv" else None,
                     held_basis, held_target, capture.count, alpha, pending,
                     held_rows=capture.held_count if held_basis is not None else 0)


def _sample_outputs(source: np.ndarray, matrix: np.ndarray, geometry: ConvGeometry | None) -> np.ndarray:
    if geometry is None:
        return source.astype(np.float64) @ matrix
    return conv_apply(source, matrix, geometry)


def _basis_target(chol: np.ndarray, cross: np.ndarray | None, matrix: np.ndarray):
    """(A, B) of the module docstring from the Cholesky factor L (and the cross Gram C)."""
    basis = chol.T
    if cross is None:
        return basis, basis @ matrix
    import scipy.linalg

    return basis, scipy.linalg.solve_triangular(chol, cross @ matrix, lower=True, check_finite=False)


def shrinkage(capture: Capture) -> float:
    """How far a layer's Gram matrix is shrunk towards the identity (scaled to its mean
    diagonal) before the fit: the Ledoit-Wolf intensity (the sampling noise of the Gram
    matrix's entries, estimated from the rows' fourth moments, over its distance to the
    scaled identity) when it has fewer rows than features, else 0. Such a Gram matrix has
    rank at most its row count: it claims that most input directions are never used, and a
    fit trusting it is free to do anything in them. The intensity is large where the rows
    scatter over many directions (then the data-free fit, intensity 1, is nearly as good) and
    small where they keep to a few. The output error of such a layer is measured on the
    shrunk matrix too."""
    gram, rows = capture.gram, capture.count
    if gram is None or rows <= 0 or rows >= gram.shape[0]:
        return 0.0
    sample = gram / rows
    mu = float(np.trace(sample)) / sample.shape[0]
    distance = float(np.sum(sample**2)) - 2 * mu * float(np.trace(sample)) + mu**2 * sample.shape[0]
    noise = capture.fourth / rows**2 - float(np.sum(sample**2)) / rows
    if distance <= 0:
        return 1.0
    return float(min(1.0, max(noise / distance, 0.0)))


def shrink(gram: np.ndarray, cross: np.ndarray | None, alpha: float):
    """(1 - alpha) G + alpha mu I, and the cross Gram the same way (so that a model fed its
    own inputs, cross = gram, still gets the plain whitened fit)."""
    if alpha <= 0:
        return gram, cross
    mu = float(np.trace(gram)) / gram.shape[0]
    eye = alpha * mu * np.eye(gram.shape[0])
    return (1 - alpha) * gram + eye, None if cross is None else (1 - alpha) * cross + eye


def _cholesky(gram: np.ndarray) -> np.ndarray:
    """L with L L^T = gram + ridge I; the ridge grows when float32 round-off in the
    accumulated Gram matrix leaves it indefinite."""
    n = gram.shape[0]
    mean = max(np.trace(gram) / n, 1e-300)
    sym = (gram + gram.T) / 2
    for ridge in RIDGE * 10.0 ** np.arange(6):
        try:
            return np.linalg.cholesky(sym + ridge * mean * np.eye(n))
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("calibration Gram matrix far from positive semi-definite")


def conv_apply(maps: np.ndarray, matrix: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """An ONNX Conv or ConvTranspose (group 1) with canonical weight matrix (S*k x T) on maps
    (B x S x ...), no bias."""
    rows, out = patches(maps, tuple(geometry.kernel), geometry.attrs, geometry.transposed)
    rows = rows.astype(np.float64) @ matrix
    y = rows.reshape((maps.shape[0],) + tuple(out) + (matrix.shape[1],))
    return np.moveaxis(y, -1, 1)


# ------------------------------------------------------------------ refinement


def refine(fact, data: LayerData, *, iterations: int = REFINE_ITERATIONS) -> tuple[float, float]:
    """Fit the cores of a linear factorisation to the layer's calibration outputs, starting
    from their current values; returns the relative output error before and after. Dense
    chains and convs (through their composed kernel, see KernelProbe) train on the Gram
    basis: exact for all calibration rows. Refinement never makes the error worse: the
    start is kept if nothing improves."""
    if data.basis is None:
        return (np.nan, np.nan)
    if isinstance(fact, ChainFactorization) and data.kind == "dense":
        module, inputs = fact.torch_module(), data.basis
    elif isinstance(fact, ConvFactorization) and data.kind == "conv":
        probe = KernelProbe(fact, data.geometry)
        if not probe.exact:
            return (np.nan, np.nan)
        module, inputs = probe, data.basis
    else:
        return (np.nan, np.nan)
    cores = module.conv.cores if isinstance(module, KernelProbe) else module.cores
    _load_float64(cores, fact.cores)
    if data.out_factor is not None:
        module = _Weighed(module, data.out_factor)
    before, after = train(module, inputs, data.target, iterations=iterations)
    fact.cores = {k: v.detach().numpy().astype(np.float64) for k, v in cores.items()}
    return before, after


def _load_float64(parameters, cores: dict) -> None:
    """Torch modules are built in float32 (what ONNX runs); fitting starts from the exact cores,
    copied: training must not write into arrays a format keeps cached (tucker's and cp's rungs)."""
    import torch

    for key, p in parameters.items():
        p.data = torch.from_numpy(np.array(cores[key], dtype=np.float64, order="C"))


class KernelProbe:
    """A factorised conv as a differentiable map from im2col rows to outputs: the rows
    times its composed kernel (S*k x T). The kernel is read off the torch module run with
    pads, strides and dilations removed on S*k one-hot probe images of the kernel's size
    (every stage then shrinks the image, ending at one position). `exact` says whether that
    agrees with the factorisation's own dense kernel; when not, the conv is not refined."""

    def __init__(self, fact: ConvFactorization, geometry: ConvGeometry):
        import torch

        kernel = tuple(geometry.kernel)
        self.conv = fact.torch_module(ConvGeometry(kernel, {}))
        s, k = fact.channels[1], int(np.prod(kernel))
        self.images = torch.eye(s * k, dtype=torch.float64).reshape((s * k, s) + kernel)
        self.exact = False
        try:
            with torch.no_grad():
                got = self.kernel_matrix(torch.float32).numpy()
            want = fact.to_dense().reshape(fact.channels[0], -1).T
            self.exact = got.shape == want.shape and np.allclose(got, want, rtol=1e-4,
                                                                 atol=1e-5 * np.abs(want).max())
        except (RuntimeError, ValueError):
            pass

    def kernel_matrix(self, dtype=None):
        images = self.images if dtype is None else self.images.to(dtype)
        out = self.conv(images)
        return out.reshape(out.shape[0], -1)

    # the part of the nn.Module interface fit.train uses
    def double(self):
        self.conv.double()
        return self

    def parameters(self):
        return self.conv.parameters()

    def __call__(self, rows):
        return rows @ self.kernel_matrix()


class _Weighed:
    """A module's outputs times a fixed matrix (LayerData.out_factor), for fit.train."""

    def __init__(self, module, factor: np.ndarray):
        import torch

        self.module, self.factor = module, torch.as_tensor(factor)

    def double(self):
        import torch

        return self.to(torch.float64)

    def to(self, dtype):
        self.module.to(dtype)
        self.factor = self.factor.to(dtype)
        return self

    def parameters(self):
        return self.module.parameters()

    def __call__(self, rows):
        return self.module(rows) @ self.factor


def train(module, inputs: np.ndarray, targets: np.ndarray, *, iterations: int = REFINE_ITERATIONS,
          batch: int | None = None, seed: int = 0, dtype: str = "float64") -> tuple[float, float]:
    """Minimise ||module(inputs) - targets||^2 / ||targets||^2 over the module's parameters
    in float64 (or `dtype`, e.g. "float32": some 3x faster for large chains, the precision
    of what ONNX runs): full-batch L-BFGS with strong-Wolfe line search, or Adam on
    minibatches of `batch` samples when given (large sample sets, nonsmooth activations).
    The parameters end at the best point seen. Returns the relative error before and after."""
    with torch_threads(1):  # small problems: threads only add synchronisation
        return _train(module, inputs, targets, iterations, batch, seed, dtype)


@contextmanager
def torch_threads(count: int | None):
    """Run the block with torch on `count` threads (None: leave it as it is), and restore
    the caller's thread count afterwards, also when the block raises."""
    import torch

    threads = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(module, inputs, targets, iterations, batch, seed, dtype="float64"):
    import torch

    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    if kind == torch.float64:
        module.double()
    else:
        module.to(kind)
    x = torch.as_tensor(np.asarray(inputs), dtype=kind)
    y = torch.as_tensor(np.asarray(targets), dtype=kind)
    scale = float((y**2).sum()) or 1.0
    params = [p for p in module.parameters() if p.requires_grad]

    def full_loss() -> float:
        with torch.no_grad():
            return float(((module(x) - y) ** 2).sum()) / scale

    start = [p.detach().clone() for p in params]
    before = best = full_loss()
    best_params = start
    if batch is None:
        opt = torch.optim.LBFGS(params, lr=1, max_iter=iterations, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure():
            opt.zero_grad()
            loss = ((module(x) - y) ** 2).sum() / scale
            loss.backward()
            return loss

        opt.step(closure)
    else:
        opt = torch.optim.Adam(params, lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        for step in range(iterations):
            index = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator)
            opt.zero_grad()
            loss = ((module(x[index]) - y[index]) ** 2).sum() / float((y[index] ** 2).sum() or 1.0)
            loss.backward()
            opt.step()
            if (step + 1) % 50 == 0 or step == iterations - 1:
                current = full_loss()
                if current < best:
                    best, best_params = current, [p.detach().clone() for p in params]
    after = full_loss()
    if not np.isfinite(after) or after > best:
        after = best
        with torch.no_grad():
            for p, v in zip(params, best_params):
                p.copy_(v)
    return float(np.sqrt(before)), float(np.sqrt(after))


def _evaluate(fact, data: LayerData) -> np.ndarray:
    """The factorisation's outputs on the sampled inputs (numpy reference for chains, the
    torch module for convs)."""
    if data.kind == "dense":
        return fact.apply(data.inputs.astype(np.float64))
    import torch

    module = fact.torch_module(data.geometry).double()
    with torch.no_grad():
        return module(torch.as_tensor(data.inputs, dtype=torch.float64)).numpy()


# ------------------------------------------------------------------ sequential order


def levels(graph, layers: list[Layer]) -> list[list[Layer]]:
    """Group the main graph's `layers` by how many of them lie on the longest path before
    each one: the layers of one level see no output of each other, so they are fitted
    together, each level on the outputs of the levels before it (rewritten)."""
    depth: dict[str, int] = {}
    by_node = {id(layer.node): layer for layer in layers}
    level_of: dict[int, int] = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            level_of[id(node)] = d
            d += 1
        for o in node.output:
            depth[o] = d
    grouped: dict[int, list[Layer]] = {}
    for layer in layers:
        if id(layer.node) in level_of:
            grouped.setdefault(level_of[id(layer.node)], []).append(layer)
    return [grouped[k] for k in sorted(grouped)]
