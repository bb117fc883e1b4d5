"""The features-first emission of a chain: rows trailing, cores multiplied from the left.

`run_chain` (emit.py) keeps the rows leading: every step transposes the activation
[R, modes...] so that the contracted modes come last, and the core multiplies from the
right. At transformer shapes (hundreds to thousands of rows) those Transposes of small
blocks take about half the time (ALGORITHMS.md section 12). Here the rows are flattened
and moved to the last axis once, x [R, N] -> [N, R], and each core multiplies from the
left:

    core [K?, new, contracted]  @  state [K?, lead, contracted, tail * R]
                               ->  state [K?, lead, new, tail * R]

A MatMul broadcasts the 2-D core over the `lead` axis (free modes ahead of the contracted
ones), so a step needs no permutation when its contracted modes are adjacent in the
state; when a permutation is needed it keeps R last and moves blocks of at least R
contiguous values. K is the product of the kept labels (held by a later core too, as
CP's rank): a batched MatMul. One Transpose back, [M, R] -> [R, M], ends the chain.

The order of the steps and the order of each core's new modes decide how many
permutations remain; `plan_features_first` picks among a few candidates with a cost
model (MACs plus moved values). For a nonlinear chain (an activation between steps) the
order is part of the function and is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from .emit import Chain, Core, OnnxOps, _prod, split_labels

# The cost model, in multiply-adds (ONNX Runtime CPU, fp32, measured roughly on a busy
# 2-core machine: a guide to rank candidates, not a timing). A moved value costs about
# MOVE_COST (a Transpose moves a few values per cycle, a GEMM does tens of multiply-adds);
# every GEMM of a batched MatMul costs about BATCH_COST (calls, packing, short rows),
# which makes a few permutations worth it when they replace hundreds of small GEMMs.
MOVE_COST = 8
BATCH_COST = 25_000
ROWS = 128  # the rows the cost is estimated at, unless told


@dataclass
class LayoutStep:
    """One step in the features-first layout. `perm` (None: no permutation) reorders the
    state's label axes to keep + lead + contracted + tail; the rows axis stays last."""

    core: Core
    perm: list[int] | None
    before: list[str]  # the state's labels before the step, in memory order
    keep: list[str]
    lead: list[str]
    contracted: list[str]
    tail: list[str]
    new: list[str]

    @property
    def after(self) -> list[str]:
        return self.keep + self.lead + self.new + self.tail


@dataclass
class Layout:
    steps: list[LayoutStep]
    out_perm: list[int] | None  # the final permutation to the chain's out-labels
    cost: float  # per call at `rows` rows: multiply-adds + MOVE_COST x moved + BATCH_COST x GEMMs


def plan_layout(chain: Chain, order: list[Core], new_first: str, rows: int = ROWS) -> Layout:
    """The features-first layout of `chain` absorbed in `order`. New modes are put in
    the state as `new_first` says: "out" (output modes first, then the others, the one
    needed soonest last, next to the modes it will be contracted with) or "bond" (bond
    modes first, the one needed soonest first)."""
    sizes, outs = chain.sizes, list(chain.out_labels)
    labels, steps, cost = list(chain.in_labels), [], 0.0
    for i, core in enumerate(order):
        rest = order[i + 1:]
        later = set(outs).union(*(c.labels for c in rest))
        keep, free, contracted, new = split_labels(labels, core.labels, later)
        if contracted:
            first = min(labels.index(l) for l in contracted)
            lead = [l for l in labels[:first] if l in free]
        else:
            lead = []  # an outer product: one MatMul over all the free modes as columns
        tail = [l for l in free if l not in lead]
        target = keep + lead + contracted + tail
        perm = None if target == labels else [labels.index(l) for l in target]
        if perm is not None:
            cost += rows * MOVE_COST * _prod(sizes, labels)
        next_use = {l: next((j for j, c in enumerate(rest) if l in c.labels), len(rest)) for l in new}

        def key(l):
            if new_first == "out":
                return (0, outs.index(l)) if l in outs else (1, -next_use[l])
            return (1, outs.index(l)) if l in outs else (0, next_use[l])

        new = sorted(new, key=key)
        cost += rows * _prod(sizes, keep + lead + contracted + tail + new) + BATCH_COST * _prod(sizes, keep + lead)
        steps.append(LayoutStep(core, perm, labels, keep, lead, contracted, tail, new))
        labels = steps[-1].after
    out_perm = None if labels == outs else [labels.index(l) for l in outs]
    if out_perm is not None:
        cost += rows * MOVE_COST * _prod(sizes, outs)
    return Layout(steps, out_perm, cost)


def layout_candidates(chain: Chain, rows: int = ROWS) -> list[Layout]:
    """Distinct candidate layouts, cheapest first by the cost model (a planner that times
    layers may time several). A linear chain may be absorbed in any order: its own (fewest
    MACs, best_order) and the reverse are tried; a nonlinear chain keeps its order."""
    orders = [list(chain.steps)]
    if chain.activation is None and len(chain.steps) > 1:
        orders.append(list(reversed(chain.steps)))
    out, seen = [], set()
    for layout in sorted((plan_layout(chain, order, new_first, rows) for order in orders
                          for new_first in ("out", "bond")), key=lambda layout: layout.cost):
        key = tuple((s.core.key, tuple(s.perm or ()), tuple(s.new)) for s in layout.steps)
        if key not in seen:
            seen.add(key)
            out.append(layout)
    return out


def plan_features_first(chain: Chain, rows: int = ROWS) -> Layout:
    """The cheapest candidate layout by the cost model."""
    return layout_candidates(chain, rows)[0]


def run_chain_features_first(ops, x, chain: Chain, cores: dict, layout: Layout | None = None):
    """Evaluate `chain` on x [*batch, N] in the features-first layout with backend `ops`
    (NumpyOps, TorchOps, OnnxOps); returns [*batch, M], like run_chain."""
    sizes = chain.sizes
    layout = layout or plan_features_first(chain)
    state = ops.to_columns(x, chain.in_features)  # [N, R]
    shaped = [chain.in_features]  # the state's label axes as currently shaped (rows excluded)

    def to_shape(t, target):
        nonlocal shaped
        if shaped != list(target):
            t, shaped = ops.reshape_all(t, list(target) + [-1]), list(target)
        return t

    for i, step in enumerate(layout.steps):
        if step.perm is not None:
            state = to_shape(state, [sizes[l] for l in step.before])
            state = ops.permute_all(state, step.perm + [len(step.perm)])
            shaped = [sizes[step.before[p]] for p in step.perm]
        keep, lead = _group(sizes, step.keep), _group(sizes, step.lead)
        state = to_shape(state, keep + lead + [_prod(sizes, step.contracted)])
        core = ops.left_core(cores[step.core.key], step.core.labels, step.keep, step.contracted, step.new, sizes,
                             bool(lead))
        state = ops.matmul(core, state)
        shaped = keep + lead + [_prod(sizes, step.new)]
        if chain.activation and i < len(layout.steps) - 1:
            state = ops.activation(state, chain.activation)
    if layout.out_perm is not None:
        labels = layout.steps[-1].after
        state = to_shape(state, [sizes[l] for l in labels])
        state = ops.permute_all(state, layout.out_perm + [len(labels)])
        shaped = [sizes[l] for l in chain.out_labels]
    state = to_shape(state, [chain.out_features])
    return ops.from_columns(state, x, chain.out_features)


def emit_chain_features_first(builder, x: str, chain: Chain, cores: dict, batch_rank: int,
                              layout: Layout | None = None) -> str:
    return run_chain_features_first(OnnxOps(builder, batch_rank), x, chain, cores, layout)


def _group(sizes: dict[str, int], labels) -> list[int]:
    """One axis for a group of labels, none for an empty group."""
    return [_prod(sizes, labels)] if labels else []
