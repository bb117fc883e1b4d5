"""Activation capture: running a model on calibration batches with layer inputs exposed,
accumulating what data-aware fitting needs in bounded memory (Gram matrices, held-out
Gram matrices, a uniform sample of inputs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from .patches import patches

# Bounds on what capture keeps per layer besides its Gram matrix: sampled input rows (dense)
# or sampled input maps (conv) for the fits that need real samples (nonlinear chains, conv
# refinement), and the largest Gram matrix accumulated (a conv's S*k patch length).
MAX_SAMPLE_ROWS = 8192
MAX_SAMPLE_BYTES = 64 << 20
MAX_GRAM_SIZE = 8192
# every HOLDOUT_EVERY-th calibration sample (axis 0 of a layer's input, counted over the
# batches) goes into a held-out Gram matrix instead of the fitted one: candidates are judged
# on samples their fit did not see
HOLDOUT_EVERY = 4


@dataclass
class Probe:
    """What to capture for one tensor: rows of its last axis (dense layers), or the patches
    a conv with this kernel and these attributes reads (im2col rows, channel-major)."""

    kind: str  # "dense", "conv" or "conv-transpose"
    kernel: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.kind, self.kernel, tuple(sorted((k, str(v)) for k, v in self.attrs.items())))


@dataclass
class Capture:
    """A layer input seen on calibration data, in bounded memory: the Gram matrix of its rows
    (patches for convs), the cross Gram with the original model's rows when the inputs come
    from a partly rewritten model (sequential fitting), and a uniform sample of inputs."""

    gram: np.ndarray | None  # X~^T X~ (None: patch length above MAX_GRAM_SIZE)
    count: int  # rows behind the Gram matrix
    cross: np.ndarray | None = None  # X~^T X, sequential fitting only
    samples: np.ndarray | None = None  # dense: (R, N) rows; conv: (B, S, *spatial) maps
    reference: np.ndarray | None = None  # the original model's inputs at the same samples
    fourth: float = 0.0  # sum over the Gram matrix's rows of |row|^4 (for the Ledoit-Wolf shrinkage)
    held_gram: np.ndarray | None = None  # the same over the held-out samples (HOLDOUT_EVERY)
    held_count: int = 0
    held_cross: np.ndarray | None = None


class _Accumulator:
    def __init__(self, probe: Probe, paired: bool, seed: int):
        self.probe, self.paired = probe, paired
        self.rng = np.random.default_rng(seed)
        self.gram = self.cross = self.held_gram = self.held_cross = None
        self.count = self.seen = self.held_count = self.fed = 0
        self.fourth = 0.0
        self.samples = self.reference = None
        self.capacity = None

    def add(self, value: np.ndarray, original: np.ndarray | None) -> None:
        value = np.asarray(value, dtype=np.float32)
        original = None if original is None else np.asarray(original, dtype=np.float32)
        if self.probe.kind == "dense":
            units, ref_units = value.reshape(-1, value.shape[-1]), None if original is None else original.reshape(-1, original.shape[-1])
        else:
            units, ref_units = value, original
        self._sample(units, ref_units)
        count = value.shape[0] if value.ndim >= 2 else 1
        held = (self.fed + np.arange(count)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        self.fed += count
        if value.ndim < 2 or not held.any():
            self._accumulate(value, original, held=False)
        else:
            for part, flag in ((~held, False), (held, True)):
                if part.any():
                    self._accumulate(value[part], None if original is None else original[part], held=flag)

    def _accumulate(self, value: np.ndarray, original: np.ndarray | None, held: bool) -> None:
        rows = self._rows(value)
        if rows is None:
            return
        # one batch's sum in float32 (twice as fast), the running sum in float64
        gram = (rows.T @ rows).astype(np.float64)
        cross = None if original is None else (rows.T @ self._rows(original)).astype(np.float64)
        if held:
            self.held_gram = gram if self.held_gram is None else self.held_gram + gram
            if cross is not None:
                self.held_cross = cross if self.held_cross is None else self.held_cross + cross
            self.held_count += rows.shape[0]
            return
        self.gram = gram if self.gram is None else self.gram + gram
        if cross is not None:
            self.cross = cross if self.cross is None else self.cross + cross
        self.count += rows.shape[0]
        self.fourth += float(np.sum(np.sum(rows.astype(np.float64) ** 2, axis=1) ** 2))

    def _rows(self, value: np.ndarray) -> np.ndarray | None:
        if self.probe.kind == "dense":
            return value.reshape(-1, value.shape[-1])
        length = value.shape[1] * int(np.prod(self.probe.kernel))
        if length > MAX_GRAM_SIZE:
            return None
        return patches(value, self.probe.kernel, self.probe.attrs, self.probe.kind == "conv-transpose")[0]

    def _sample(self, units: np.ndarray, ref_units: np.ndarray | None) -> None:
        """Reservoir sampling (Algorithm R) of rows or maps, the same draws for both models."""
        if self.capacity is None:
            per_unit = units[0].nbytes * (2 if ref_units is not None else 1)
            limit = MAX_SAMPLE_ROWS if self.probe.kind == "dense" else 1 << 30
            self.capacity = max(1, min(limit, MAX_SAMPLE_BYTES // max(per_unit, 1)))
            self.samples = np.empty((self.capacity,) + units.shape[1:], np.float32)
            if ref_units is not None:
                self.reference = np.empty_like(self.samples)
        n = units.shape[0]
        index = self.seen + np.arange(n)
        slots = np.where(index < self.capacity, index, self.rng.integers(0, index + 1))
        take = slots < self.capacity
        self.samples[slots[take]] = units[take]
        if ref_units is not None:
            self.reference[slots[take]] = ref_units[take]
        self.seen += n

    def result(self) -> Capture:
        kept = min(self.seen, self.capacity or 0)
        return Capture(self.gram, self.count, self.cross,
                       None if self.samples is None else self.samples[:kept],
                       None if self.reference is None else self.reference[:kept],
                       self.fourth, self.held_gram, self.held_count, self.held_cross)


def capture(model: onnx.ModelProto, probes: Mapping[str, list[Probe]], batches, *,
            reference: onnx.ModelProto | None = None, seed: int = 0, advance=None) -> dict[tuple, Capture]:
    """Run `model` on the calibration batches with the probed tensors (main graph) exposed
    and accumulate a Capture per (tensor name, probe key). With `reference` (the original
    model, same input tensor names), it runs too and supplies the cross Gram matrices and
    the paired samples that sequential fitting needs. Tensors inside subgraphs, or that
    onnxruntime cannot expose, are left out of the result. `advance()` after each batch."""
    from . import runtime

    m, wanted = runtime.with_outputs(model, list(probes))
    if not wanted:
        return {}
    sess = runtime.session(m)
    ref_sess = None
    if reference is not None:
        ref_model, ref_wanted = runtime.with_outputs(reference, wanted)
        wanted = [w for w in wanted if w in ref_wanted]
        ref_sess = runtime.session(ref_model)
    acc = {(name, p.key): _Accumulator(p, reference is not None, seed) for name in wanted for p in probes[name]}
    for feeds in batches:
        values = dict(zip(wanted, sess.run(wanted, dict(feeds))))
        originals = dict(zip(wanted, ref_sess.run(wanted, dict(feeds)))) if ref_sess is not None else {}
        for (name, _), a in acc.items():
            a.add(values[name], originals.get(name))
        if advance is not None:
            advance()
    return {key: a.result() for key, a in acc.items()}
