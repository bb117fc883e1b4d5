"""Nonlinear tensor train (NTT, ALGORITHMS.md section 7): a TT layer with an activation
after every core contraction but the last. The shared machinery here also serves the
nonlinear tensor ring (ntr.py), which starts from tr's cores instead of tt's.

Dense: the TT-matrix chain of tt.fit_dense (same modes, rank rule and contraction order)
with `Chain.activation` set: Z_k = act(contract(Z_{k-1}, G_k)) in the chain's step order,
y = contract(Z_{d-1}, G_d). The order is part of the function: it is fixed before fitting
and emission uses it as it is (matmul, einsum and custom emission all run the same Chain).
Conv: tt.fit_conv's three Convs (1x1 S -> r_b, the kernel-sized conv r_b -> r_a with the
layer's stride/pads/dilations, 1x1 r_a -> T) with the activation after the first two.
Parameters and MACs are those of the linear format (activations cost no MACs).

Fitting (there is no closed form):
1. The linear format's decomposition of the weight, refined on the calibration data when
   there is some (fit.refine: the Gram basis, exact for all calibration rows).
2. Start points. tanh, sigmoid and gelu are smooth at 0 with slope s (1, 1/4, 1/2): each
   nonlinear step's core is scaled so that its pre-activations have a given RMS, the next
   core compensates (1 / (s * scale)) and the last core the rest, so a small RMS computes
   nearly the linear fit. relu is positively homogeneous (scaling changes nothing), and the
   sign trick relu(z) - relu(-z) = z would give an exact start only at half the bond ranks
   (the doubled bonds cost 2-4x parameters); measured on LeNet-5's dense layers it ended
   worse than starting from the linear cores as they are, so relu starts from those.
   sigmoid's offset (sigmoid(0) = 1/2) cannot be compensated without biases: its start is
   the unscaled cores or a scaled one, neither close to the linear fit.
   Candidates per activation (STARTS; None: the cores as fitted):
     tanh: RMS 0.01 (the linear fit, to about a per cent) and RMS 1 (a nonlinear regime);
     gelu: RMS 0.001 (its even part, 0.4 z^2, adds up coherently over the next contraction:
           at 0.01 it still cost a few per cent of output error) and RMS 1;
     sigmoid: unscaled and RMS 1; relu: unscaled.
   A near-linear start alone stays near-linear (on outputs of an NTT teacher it stalled at
   the linear error while RMS 1 recovered the teacher exactly), a nonlinear one loses to it
   on layers whose target is linear; so every candidate gets a short probe (PROBE of the
   iterations) and the best continues.
3. Distillation (fit.train, full-batch L-BFGS in float32) on sampled calibration inputs ->
   the original layer's outputs, in chunks of the probe's length. An equal number of other
   samples is held out: the start and the stopping point are chosen by the error on them
   (fitting a few hundred rows of a large layer lowered their error while raising it on
   the rest), so a near-linear start is kept when distillation does not beat it. Without
   calibration data: Gaussian inputs x with targets x W (dense; conv: Gaussian patches of
   the kernel's size, one output position each): for a linear chain E||x (W - W~)||^2 is
   proportional to ||W - W~||_F^2, so this is fitting the weight. The number of samples
   follows a compute budget (FIT_MACS per pass, between MIN_SAMPLES and MAX_SAMPLES rows;
   option `samples`); tnonnx then warns (MissingCalibrationWarning: the result is at best
   the linear format's and the activations are tuned to inputs the model never sees).
   `fact.distillation` records the held-out errors at the start and at
   the kept point, the start's RMS (None: unscaled) and the sample counts.

Options (format_options, also given to the other formats, which ignore them):
  act      the activation, one of emit.ACTIVATIONS (default relu)
  iters    L-BFGS iterations of the distillation (default ITERATIONS)
  samples  calibration rows (dense) or maps (conv) used by the fit (default: the budget)

What to expect: the targets are the original layer's outputs, linear in its inputs (with
--fit aware); at equal parameters the fit then ends at the data-aware linear fit (tanh,
gelu: their near-linear start is kept) or above it (relu, sigmoid), see docs/bench_ntt.md.
It gains where the map from the layer's inputs to its targets is itself nonlinear (tests:
outputs of an NTT teacher, where TT's best is several times worse).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..emit import ACTIVATIONS, NumpyOps, run_chain
from ..errors import MissingCalibrationWarning, NotApplicable, TnonnxError
from . import tt
from .base import ChainFactorization, ConvFactorization, ConvGeometry, RankSpec

NAME = "ntt"
NEEDS_DATA = True  # fitted to the layer's outputs (calibration data when given)
NONLINEAR = True  # not a candidate of --format auto / --budget

ITERATIONS = 60
PROBE = 0.2  # share of the iterations each start candidate gets before the best continues
FIT_MACS = 2e8  # multiply-adds per pass over the fit samples
MIN_SAMPLES, MAX_SAMPLES = 512, 4096
FIT_POSITIONS = 1 << 16  # conv: output positions over the fit's sampled maps (small convs run slowly in torch)
SLOPE = {"tanh": 1.0, "sigmoid": 0.25, "gelu": 0.5}  # derivative at 0 (of the activations started scaled)
STARTS = {"tanh": (0.01, 1.0), "gelu": (0.001, 1.0), "sigmoid": (None, 1.0), "relu": (None,)}


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, data=None,
              act: str = "relu", iters: int = ITERATIONS, samples: int | None = None, **options) -> ChainFactorization:
    return nonlinear_dense(tt, NAME, weight, spec, modes=modes, order=order, data=data, act=act, iters=iters,
                           samples=samples, **options)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, data=None, act: str = "relu", iters: int = ITERATIONS,
             samples: int | None = None, **options) -> ConvFactorization:
    return nonlinear_conv(tt, NAME, kernel, spec, data=data, act=act, iters=iters, samples=samples, **options)


def start(weight: np.ndarray, spec: RankSpec, **options):
    """The structure without fitting (tnonnx.nn trains it from scratch)."""
    return unfitted(tt, NAME, weight, spec, **options)


# ------------------------------------------------------------------ shared with ntr


def unfitted(linear, name: str, weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None,
             act: str = "relu", factory=None, **options):
    """The `linear` format's decomposition of `weight` (dense N x M or conv kernel) with
    `act` between its steps, not distilled."""
    if weight.ndim > 2:
        return activated(linear.fit_conv(weight, spec, **options), name, act, factory)
    return activated(linear.fit_dense(weight, spec, modes=modes, order=order, **options), name, act)


def check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise TnonnxError(f"act '{act}': choose from {', '.join(ACTIVATIONS)}")
    return act


def activated(start, name: str, act: str, factory=None):
    """The linear factorisation `start` (a chain or conv stages) with `act` between its
    steps, cores as they are: the nonlinear format's structure before any fitting (also
    what tnonnx.nn trains from scratch). `factory` (conv): the class built from the
    start's fields, default its own."""
    from dataclasses import fields, replace

    check_activation(act)
    if isinstance(start, ChainFactorization):
        return ChainFactorization(name, replace(start.chain, activation=act), start.cores, start.ranks, start.modes)
    values = {f.name: getattr(start, f.name) for f in fields(start)} | {"format": name, "activation": act}
    return (factory or type(start))(**values)


def nonlinear_dense(linear, name: str, weight: np.ndarray, spec: RankSpec, *, modes, order, data, act: str,
                    iters: int, samples: int | None, **options) -> ChainFactorization:
    """The `linear` format's chain (tt or tr) with `act` between its steps, fitted as the
    module docstring says."""
    start = linear.fit_dense(weight, spec, modes=modes, order=order, **options)
    _refine(start, data)
    fact = activated(start, name, act)
    rows = _count(samples, fact.chain.macs_per_row())
    rng = np.random.default_rng(0)
    if _has_samples(data):
        sets = _split(data.inputs, data.outputs, rows, rng)
    else:
        warn_no_calibration(name)
        x = rng.standard_normal((2 * max(rows, min(2 * weight.shape[0], MAX_SAMPLES)), weight.shape[0]))
        sets = _split(x, x @ weight, len(x) // 2, rng)
    units = [[core.key] for core in fact.chain.steps]
    return _distil(fact, units, lambda f: f.torch_module(), _chain_rms, sets, iters)


def nonlinear_conv(linear, name: str, kernel: np.ndarray, spec: RankSpec, *, data, act: str, iters: int,
                   samples: int | None, factory=None, **options) -> ConvFactorization:
    """The `linear` format's Conv stages (tt or tr) with `act` between them; `factory`
    builds the nonlinear factorisation from the linear one's fields (default: the same class)."""
    auto_pad = data.geometry.attrs.get("auto_pad", "NOTSET") if data is not None and data.geometry else "NOTSET"
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotApplicable(f"{name}: auto_pad {auto_pad} convs are not fitted (the torch module takes explicit pads)")
    start = linear.fit_conv(kernel, spec, **options)
    _refine(start, data)
    fact = activated(start, name, act, factory)
    rng = np.random.default_rng(0)
    if _has_samples(data):
        geometry = data.geometry
        per_map = fact.macs(ConvGeometry(geometry.kernel, geometry.attrs, tuple(data.inputs.shape[2:])))
        positions = math.prod(data.outputs.shape[2:])
        n = samples if samples is not None else min(FIT_MACS // max(per_map, 1), FIT_POSITIONS // max(positions, 1))
        sets = _split(data.inputs, data.outputs, max(1, int(n)), rng)
    else:  # Gaussian patches of the kernel's size: one output position each
        warn_no_calibration(name)
        ks = tuple(kernel.shape[2:])
        geometry = ConvGeometry(ks, {}, ks)
        n = 2 * max(_count(samples, fact.macs(geometry)), min(2 * math.prod(kernel.shape[1:]), MAX_SAMPLES))
        x = rng.standard_normal((n,) + tuple(kernel.shape[1:]))
        y = (x.reshape(n, -1) @ kernel.reshape(kernel.shape[0], -1).T).reshape((n, kernel.shape[0]) + (1,) * len(ks))
        sets = _split(x, y, n // 2, rng)
    # the cores of each stage: its train, or (the spatial stage) the cores of no train
    keys = [k for k in fact.cores if not any(k in s.train for s in fact.stages)]
    units = [list(stage.train) if stage.train else keys for stage in fact.stages]
    if not all(units):
        raise NotApplicable(f"{name}: a stage of this conv has no core of its own to scale")
    return _distil(fact, units, lambda f: f.torch_module(geometry), _conv_rms(geometry), sets, iters)


_LINEAR = {"ntt": "tt", "ntr": "tr"}
_warned: set[str] = set()  # the formats warn_no_calibration has warned about in this process


def warn_no_calibration(name: str) -> None:
    """Warn (MissingCalibrationWarning) that a nonlinear layer is being fitted to Gaussian
    inputs: with no calibration data it only imitates the weight, at best about as well as
    the linear format would, and its activations are tuned to inputs the model never sees.
    Once per format and process, not once per layer (torch resets Python's own once-only
    bookkeeping whenever it touches the warning filters)."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"--format {name} needs calibration data to be meaningful: without it, its layers are fitted to Gaussian "
        "random inputs, not to the inputs they see in the model, so the activations between the cores are tuned to "
        f"nothing real and the result is at best about what the linear format ({_LINEAR.get(name, 'linear')}) "
        "gives. Give --calib FILE.npz with --fit aware or --fit sequential (from Python: calib=..., fit=\"aware\").",
        MissingCalibrationWarning, stacklevel=2)


def _refine(fact, data) -> None:
    """The linear start fitted to the calibration data (the Gram basis, as the linear
    format's own data-aware fit does), when there is some."""
    if data is not None and data.basis is not None:
        from ..fit import refine

        refine(fact, data)


def _has_samples(data) -> bool:
    return data is not None and data.inputs is not None and len(data.inputs) > 0 and data.outputs is not None


def _count(samples: int | None, macs_per_sample: int) -> int:
    if samples is not None:
        return max(1, int(samples))
    return int(min(MAX_SAMPLES, max(MIN_SAMPLES, FIT_MACS // max(macs_per_sample, 1))))


def _split(inputs: np.ndarray, outputs: np.ndarray, n: int, rng) -> tuple[tuple, tuple]:
    """(fit set, held-out set): n samples to fit, and as many others (at least a fifth of
    all samples, at most n) to choose the start and the stopping point by."""
    order = rng.permutation(len(inputs))
    held = min(n, max(len(inputs) - n, len(inputs) // 5))
    fit, rest = np.sort(order[:len(inputs) - held][:n]), np.sort(order[len(inputs) - held:])
    if not len(rest):  # a single sample: it is both
        rest = fit
    return (inputs[fit], outputs[fit]), (inputs[rest], outputs[rest])


# ------------------------------------------------------------------ start points and distillation


class _RmsRecorder(NumpyOps):
    """Evaluates a chain linearly (the activation as identity), recording the RMS of every
    state an activation would see."""

    def __init__(self, batch_rank: int):
        super().__init__(batch_rank)
        self.rms: list[float] = []

    def activation(self, t, name):
        self.rms.append(float(np.sqrt(np.mean(np.square(t)))))
        return t


def _chain_rms(fact: ChainFactorization, x: np.ndarray) -> list[float]:
    recorder = _RmsRecorder(batch_rank=1)
    run_chain(recorder, np.asarray(x, dtype=np.float64), fact.chain, fact.cores)
    return recorder.rms


def _conv_rms(geometry: ConvGeometry):
    def measure(fact, x: np.ndarray) -> list[float]:
        import torch

        rms = []

        def identity(t):
            rms.append(float(torch.sqrt(torch.mean(t**2))))
            return t

        module = fact.torch_module(geometry).double()
        module.activate = identity
        with torch.no_grad():
            module(torch.as_tensor(np.asarray(x), dtype=torch.float64))
        return rms

    return measure


def _rescaled(cores: dict, units: list[list[str]], rms: list[float], target: float, slope: float) -> dict:
    """Scale step k's cores by c_k / (slope c_{k-1}), c_k = target / rms_k (the last step by
    1 / (slope c_{last-1})): pre-activations of RMS `target`, the same function where the
    activation is linear."""
    out = dict(cores)
    previous = 1.0 / slope  # so that the first step is scaled by c_0
    for k, unit in enumerate(units):
        if k < len(units) - 1:
            c = target / max(rms[k], 1e-30)
            factor, previous = c / (slope * previous), c
        else:
            factor = 1.0 / (slope * previous)
        out[unit[0]] = out[unit[0]] * factor  # one core per step carries its scale
    return out


def _distil(fact, units, make_module, measure, sets, iters: int):
    """Probe the start candidates, continue the best in chunks of the probe's length; the
    kept cores (fact.cores) are those with the lowest error on the held-out samples among
    every candidate's start and every chunk's end (the fit itself keeps its best point on
    the fit samples, which can overfit them)."""
    import torch

    from ..fit import train

    (x, y), (x_held, y_held) = sets
    x_held = torch.as_tensor(np.asarray(x_held), dtype=torch.float32)

    def held_out_error(module) -> float:
        with torch.no_grad():
            return _relative(module(x_held).double().numpy(), y_held)

    act = fact.chain.activation if isinstance(fact, ChainFactorization) else fact.activation
    rms = measure(fact, x) if any(t is not None for t in STARTS[act]) else None
    candidates = [(t, fact.cores if t is None else _rescaled(fact.cores, units, rms, t, SLOPE[act]))
                  for t in STARTS[act]]
    chunk = max(1, int(iters * PROBE))
    kept = None  # (held-out error, cores)
    probes = []
    for target, cores in candidates:
        fact.cores = cores
        module = make_module(fact).float()
        start = held_out_error(module)
        if kept is None or start < kept[0]:
            kept = (start, cores)
        error = start
        if iters > 0 and len(candidates) > 1:
            train(module, x, y, iterations=chunk, dtype="float32")
            error = held_out_error(module)
            kept = _keep(kept, error, module)
        probes.append((error, target, start, module))
    error, target, start, module = min(probes, key=lambda p: p[0])
    remaining = iters - (chunk * len(candidates) if len(candidates) > 1 else 0)
    while remaining > 0:
        train(module, x, y, iterations=min(chunk, remaining), dtype="float32")
        remaining -= chunk
        kept = _keep(kept, held_out_error(module), module)
    fact.cores = kept[1]
    fact.distillation = {"start": start, "end": kept[0], "start_rms": target, "samples": len(x),
                         "held_out": len(y_held)}
    return fact


def _keep(kept, error: float, module):
    if np.isfinite(error) and error < kept[0]:
        return error, {k: v.detach().double().numpy().copy() for k, v in module.cores.items()}
    return kept


def _relative(approx: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(approx - target) / max(np.linalg.norm(target), 1e-300))
