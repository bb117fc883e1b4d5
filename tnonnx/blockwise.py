"""Block-wise refinement (--fit blockwise): after the per-layer fits, the rewritten model is
cut into blocks at its residual additions and normalisations, and each block's new cores are
trained, block after block, to reproduce what the ORIGINAL model computes at the block's
outputs, fed with what the already refined blocks before it compute (the anchored
objective of AA-SVD). A few passes of Adam (cosine-annealed) over the calibration batches per block; the
block's calibration error is never raised (its start is kept when no pass improves on it).
Memory: one block's inputs and targets over the calibration batches.

The blocks run in finetune.py's interpreter (GraphModule) on a sub-model of the block's
nodes, its inputs the tensors it reads from outside (computed by onnxruntime on the model
refined so far), its targets the tensors it leaves for the nodes after it, from the
original model at the same names.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .finetune import LEARNING_RATE, GraphModule, _relative, store
from .fit import torch_threads

BLOCK_EPOCHS = 4
BLOCK_MIN_STEPS = 60  # Adam steps per block at least (a few calibration batches make few steps per pass)
# a cut after these ops; an Add only when both its inputs are computed (a residual addition,
# not a bias)
BOUNDARY_OPS = ("Add", "LayerNormalization", "BatchNormalization", "GroupNormalization")


def boundaries(model: onnx.ModelProto) -> list[int]:
    """Indices of the main graph's nodes after which a block ends."""
    constant = {t.name for t in model.graph.initializer}
    constant |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in BOUNDARY_OPS:
            continue
        if node.op_type == "Add" and any(x in constant or not x for x in node.input):
            continue
        out.append(i)
    return out


def blocks(model: onnx.ModelProto, trainable: set[str]) -> list[list[int]]:
    """Runs of node indices between boundaries, each holding some node that reads a
    trainable initializer; a run without one is merged into the next."""
    nodes = model.graph.node
    cuts = boundaries(model) + [len(nodes) - 1]
    out, start = [], 0
    for cut in cuts:
        if cut < start:
            continue
        run = list(range(start, cut + 1))
        if any(x in trainable for i in run for x in nodes[i].input):
            out.append(run)
            start = cut + 1
    return out


def _sub_model(model: onnx.ModelProto, run: list[int]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """(a model of the run's nodes, the tensors it reads from before it, those it leaves to
    the nodes after it or to the graph outputs)."""
    nodes = [model.graph.node[i] for i in run]
    inits = {t.name: t for t in model.graph.initializer}
    made = {o for n in nodes for o in n.output}
    reads = list(dict.fromkeys(x for n in nodes for x in n.input if x and x not in made and x not in inits))
    later = {x for n in model.graph.node[run[-1] + 1:] for x in n.input} | {o.name for o in model.graph.output}
    leaves = [o for n in nodes for o in n.output if o in later]
    used = {x for n in nodes for x in n.input}
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    del sub.graph.node[:]
    sub.graph.node.extend(nodes)
    del sub.graph.initializer[:]
    sub.graph.initializer.extend(t for name, t in inits.items() if name in used)
    return sub, reads, leaves


def refine_blocks(model: onnx.ModelProto, original: onnx.ModelProto, batches, trainable: set[str], *,
                  epochs: int = BLOCK_EPOCHS, seed: int = 0, log=None) -> list[tuple[float, float]]:
    """Refine `model`'s trainable initializers block by block, in place; returns each
    block's relative calibration error at its outputs before and after."""
    import torch

    from . import runtime

    torch.manual_seed(seed)
    results = []
    for b, run in enumerate(blocks(model, trainable)):
        sub, reads, leaves = _sub_model(model, run)
        if not leaves:
            continue
        student, reads_ok = runtime.with_outputs(model, reads)
        teacher, leaves_ok = runtime.with_outputs(original, leaves)
        if len(reads_ok) < len(reads) or not leaves_ok:
            continue  # a tensor onnxruntime cannot expose: the block keeps its per-layer fit
        s_sess, t_sess = runtime.session(student), runtime.session(teacher)
        inputs = [{k: torch.as_tensor(np.asarray(v)) for k, v in zip(reads, s_sess.run(reads, dict(f)))}
                  for f in batches]
        float_leaves = [n for n in leaves_ok if "float" in _type(t_sess, n)]
        targets = [[torch.as_tensor(np.asarray(v)) for v in t_sess.run(float_leaves, dict(f))] for f in batches]
        graph = GraphModule(sub, {t.name for t in sub.graph.initializer} & trainable)
        before, after = _train_block(graph, inputs, float_leaves, targets, epochs, seed)
        store(model, {k: v.detach() for k, v in graph.params.items()})
        results.append((before, after))
        if log:
            log(f"blockwise: block {b + 1} ({len(run)} nodes) error at its outputs {before:.4g} -> {after:.4g}")
    return results


def _type(sess, name: str) -> str:
    return next(o.type for o in sess.get_outputs() if o.name == name)


def _train_block(graph: GraphModule, inputs, names, targets, epochs: int, seed: int) -> tuple[float, float]:
    import torch

    def error() -> float:
        with torch.no_grad():
            num = den = 0.0
            for f, t in zip(inputs, targets):
                got = graph(f, names)
                num += sum(float(((g - r) ** 2).sum()) for g, r in zip(got, t))
                den += sum(float((r**2).sum()) for r in t)
            return math.sqrt(num / max(den, 1e-300))

    scales = {n: float(p.detach().pow(2).mean().sqrt()) or 1.0 for n, p in graph.params.items()}
    opt = torch.optim.Adam([{"params": [p], "lr": LEARNING_RATE * scales[n]} for n, p in graph.params.items()])
    passes = math.ceil(max(epochs * len(inputs), BLOCK_MIN_STEPS) / len(inputs)) if epochs else 0
    # from the per-layer fit, a warm start: no warm-up, the rate annealed (cosine) to zero
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(passes * len(inputs), 1))
    order = np.random.default_rng(seed)
    with torch_threads(None):
        before = best = error()
        best_state = {k: v.detach().clone() for k, v in graph.params.items()}
        every = max(1, passes // 8)  # the error is measured on all batches a few times per block
        for p in range(passes):
            for i in order.permutation(len(inputs)):
                opt.zero_grad()
                _relative(graph(inputs[i], names), targets[i]).backward()
                opt.step()
                schedule.step()
            if (p + 1) % every and p + 1 < passes:
                continue
            current = error()
            if current < best:
                best, best_state = current, {k: v.detach().clone() for k, v in graph.params.items()}
    with torch.no_grad():
        for k, v in best_state.items():
            graph.params[k].copy_(v)
    return before, best
