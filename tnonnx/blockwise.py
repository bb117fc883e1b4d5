"""Block-wise refinement (--fit blockwise): after the per-layer fits, the rewritten model is
cut into blocks at its residual additions and normalisations, and each block's new cores are
trained, block after block, to reproduce what the ORIGINAL model computes at the block's
outputs, fed with what the already refined blocks before it compute (the anchored
objective of AA-SVD). A few passes of Adam (cosine-annealed) over the calibration batches per
block; the block's calibration error is never raised (its start is kept when no pass
improves on it). Besides the new cores, the block's other weights (the dense layers the
budget kept, biases, normalisation scales) are trained too: they cost no parameters and
absorb part of the error.

Both models run in finetune.py's interpreter, advanced block by block over the calibration
batches: the rewritten model's nodes up to the block (the refined prefix), the original's
nodes its block outputs depend on. Each node of either model runs once per batch outside
the training, and only the tensors some later node still reads are kept: memory is one
block's activations, not the whole model's.
"""

from __future__ import annotations

import math
from collections import ChainMap

import numpy as np
import onnx

from .finetune import SMALL_MODEL_PARAMS, GraphModule, _relative, _run_nodes, autocast, store
from .fit import torch_threads
from .macs import all_graphs, constant_names, subgraphs

BLOCK_EPOCHS = 4
BLOCK_LEARNING_RATE = 3e-2  # Adam, relative to each tensor's RMS; LeNet-5 at 5x, 300 steps: 3e-2 beat 1e-2 (docs/RESULTS.md)
BLOCK_MIN_STEPS = 300  # Adam steps per block at least (LeNet-5 at 5x: 60 steps -1.65 points, 300 -1.25 at 1e-2)
# a cut after these ops; an Add only when it merges two branches of one stream (a residual
# addition: both inputs descend from a common tensor, neither is added elsewhere, their
# shapes do not broadcast), not a bias, a position table or an attention mask
BOUNDARY_OPS = ("Add", "LayerNormalization", "BatchNormalization", "GroupNormalization")
SHAPE_OPS = ("Shape", "Size")  # their outputs carry no values of their inputs
# the weight (and bias) inputs of these ops are trained with the block's cores
WEIGHTED_OPS = {"MatMul": (1,), "Gemm": (1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2),
                "LayerNormalization": (1, 2)}


def boundaries(model: onnx.ModelProto) -> list[int]:
    """Indices of the main graph's nodes after which a block ends."""
    constant = constant_names(model.graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    # made from the inputs' values, not only their shapes
    valued = _reached(model, {i.name for i in model.graph.input}, subgraph_reads=False)
    shapes = _shapes(model)
    added = {}  # how many Adds read each tensor: one added in several places (a mask) is no stream
    for node in model.graph.node:
        if node.op_type == "Add":
            for x in set(node.input):
                added[x] = added.get(x, 0) + 1
    out = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in BOUNDARY_OPS:
            continue
        if node.op_type == "Add" and (any(x in constant or not x for x in node.input)
                                      or any(added[x] > 1 for x in node.input)
                                      or _broadcast(*(shapes.get(x) for x in node.input[:2]))
                                      or not _ancestors(node.input[0], producer, valued)
                                      & _ancestors(node.input[1], producer, valued)):
            continue
        out.append(i)
    return out


def _shapes(model: onnx.ModelProto) -> dict:
    """Inferred dims (an int, a symbol or None) by tensor name; empty where inference fails."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]  # the values are not needed, only their shapes
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in model.graph.initializer if t.name not in {i.name for i in model.graph.input})
    try:
        inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=model.opset_import))
    except Exception:  # noqa: BLE001 - shapes only sharpen the cut; without them every merge counts
        return {}
    g = inferred.graph
    return {vi.name: [d.dim_value or d.dim_param or None for d in vi.type.tensor_type.shape.dim]
            for vi in (*g.value_info, *g.input, *g.output) if vi.type.tensor_type.HasField("shape")}


def _broadcast(a, b) -> bool:
    """Whether adding shapes a and b broadcasts one over the other (a mask, a bias), as far
    as they are known; a residual addition adds equal shapes."""
    if a is None or b is None:
        return False
    return len(a) != len(b) or any((x == 1) != (y == 1) for x, y in zip(a, b) if x is not None and y is not None)


def _ancestors(name: str, producer: dict, valued: set[str]) -> set[str]:
    """The tensors made from the graph inputs' values that `name` is made from, itself
    included (a tensor's shape is not its value)."""
    seen, stack = set(), [name]
    while stack:
        x = stack.pop()
        if x in seen or x not in valued:
            continue
        seen.add(x)
        if x in producer:
            stack.extend(producer[x].input)
    return seen


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


def block_weights(model: onnx.ModelProto, run: list[int]) -> set[str]:
    """The float weights and biases the run's weighted layers and normalisations read, and
    the constants added right after them (biases of MatMuls)."""
    floats = {t.name for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    nodes = [model.graph.node[i] for i in run]
    weighted = {o for n in nodes if n.op_type in WEIGHTED_OPS for o in n.output}
    out = set()
    for n in nodes:
        out.update(n.input[k] for k in WEIGHTED_OPS.get(n.op_type, ()) if k < len(n.input))
        if n.op_type == "Add" and any(x in weighted for x in n.input):
            out.update(n.input)
    return out & floats


def refine_blocks(model: onnx.ModelProto, original: onnx.ModelProto, batches, trainable: set[str], *,
                  epochs: int = BLOCK_EPOCHS, seed: int = 0, log=None, runs=None,
                  precision: str = "fp32") -> list[tuple[float, float]]:
    """Refine `model`'s trainable initializers, and the other weights of the blocks that hold
    them, block by block, in place; returns each block's relative calibration error at its
    outputs before and after. `runs`: blocks(model, trainable), when the caller has them.
    `precision`: the training steps' arithmetic, as finetune's (the errors are float32)."""
    import torch

    torch.manual_seed(seed)
    runs = blocks(model, trainable) if runs is None else runs
    if not runs:
        return []
    student, teacher = _Runner(model), _Runner(original)
    for f in batches:
        student.add(f)
        teacher.add(f)
    values = student.values  # the rewritten model's constants, updated as blocks are trained
    leaves_of = [_sub_model_leaves(model, run) for run in runs]
    results = []
    for b, run in enumerate(runs):
        with torch.no_grad():
            student.advance(range(student.done, run[0]))
        sub, reads = _sub_model(model, run)
        leaves = leaves_of[b]
        targets_named = [x for x in leaves if x in teacher.known]
        with torch.no_grad():
            teacher.compute(targets_named, protect={x for later in leaves_of[b + 1:] for x in later})
        train = (block_weights(model, run) | trainable) & {t.name for t in sub.graph.initializer}
        # only what the trained weights reach (an attention mask the block also leaves, its
        # -3.4e38 entries included, would swamp the error)
        reached = _reached(sub, train)
        names = [x for x in targets_named if x in reached and teacher.envs[0][x].is_floating_point()]
        if names:
            graph = GraphModule(sub, train)
            inputs = [{x: env[x] for x in reads if x in env} for env in student.envs]  # (reads of subgraphs' own tensors left out)
            targets = [[env[x] for x in names] for env in teacher.envs]
            before, after = _train_block(graph, inputs, names, targets, epochs, seed, precision)
            trained = {k: v.detach() for k, v in graph.params.items()}
            store(model, trained)
            values.update(trained)
            results.append((before, after))
            if log:
                log(f"blockwise: block {b + 1} ({len(run)} nodes) error at its outputs {before:.4g} -> {after:.4g}")
        elif log:
            log(f"blockwise: block {b + 1} ({len(run)} nodes) left as fitted: no output its weights reach")
        with torch.no_grad():
            student.advance(run)
    return results


class _Runner:
    """Runs a model's main-graph nodes on every calibration batch in the interpreter, keeping
    per batch only the tensors that nodes not yet run (or `protect`ed names) still read."""

    def __init__(self, model: onnx.ModelProto):
        # the interpreter refuses a graph with ops it does not run; its constants are every initializer
        self.values = GraphModule(model, set()).constants
        self.nodes = list(model.graph.node)
        self.reads = [_reads(n) for n in self.nodes]
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.known = set(self.producer) | {i.name for i in model.graph.input}
        self.pending = {}
        for r in self.reads:
            for x in r:
                self.pending[x] = self.pending.get(x, 0) + 1
        self.ran: set[int] = set()
        self.done = 0  # every node before this index has run
        self.envs: list[dict] = []
        self.protected: set[str] = set()

    def add(self, feeds: dict) -> None:
        import torch

        self.envs.append({k: torch.as_tensor(np.asarray(v)) for k, v in feeds.items()})

    def advance(self, indices) -> None:
        """Run these nodes (in order), then drop the tensors nothing later reads."""
        todo = [i for i in indices if i not in self.ran]
        for env in self.envs:
            _run_nodes([self.nodes[i] for i in todo], ChainMap(env, self.values))
        for i in todo:
            self.ran.add(i)
            for x in self.reads[i]:
                self.pending[x] -= 1
        while self.done in self.ran:
            self.done += 1
        for env in self.envs:
            for x in [x for x in env if not self.pending.get(x) and x not in self.protected]:
                del env[x]

    def compute(self, names, protect: set[str]) -> None:
        """Run the nodes not yet run that `names` depend on, keeping `names` and `protect`."""
        self.protected = set(names) | protect
        need, stack = set(), [self.producer[x] for x in names if x in self.producer]
        while stack:
            i = stack.pop()
            if i in need or i in self.ran:
                continue
            need.add(i)
            stack.extend(self.producer[x] for x in self.reads[i] if x in self.producer)
        self.advance(sorted(need))


def _reached(model: onnx.ModelProto, sources: set[str], subgraph_reads: bool = True) -> set[str]:
    """`sources` and the main-graph tensors whose values are computed from them (not only
    their shapes); `subgraph_reads`: what a node's subgraphs read from the outer scope counts
    as read by the node."""
    reached = set(sources)
    for node in model.graph.node:
        if node.op_type not in SHAPE_OPS and (_reads(node) if subgraph_reads else set(node.input)) & reached:
            reached.update(node.output)
    return reached


def _reads(node) -> set[str]:
    """The tensors a node reads, those its subgraphs read from the outer scope included."""
    out = {x for x in node.input if x}
    for g in subgraphs(node):
        for sub in all_graphs(g):
            out.update(x for n in sub.node for x in n.input if x)
    return out


def _sub_model_leaves(model: onnx.ModelProto, run: list[int]) -> list[str]:
    nodes = model.graph.node
    later = {x for n in nodes[run[-1] + 1:] for x in n.input} | {o.name for o in model.graph.output}
    return [o for i in run for o in nodes[i].output if o in later]


def _sub_model(model: onnx.ModelProto, run: list[int]) -> tuple[onnx.ModelProto, list[str]]:
    """(a model of the run's nodes, the tensors it reads from before it)."""
    nodes = [model.graph.node[i] for i in run]
    inits = {t.name: t for t in model.graph.initializer}
    made = {o for n in nodes for o in n.output}
    reads = list(dict.fromkeys(x for n in nodes for x in _reads(n) if x not in made and x not in inits))
    used = {x for n in nodes for x in _reads(n)}
    graph = onnx.helper.make_graph(nodes, "block", [], [], initializer=[t for n, t in inits.items() if n in used])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import)  # the interpreter reads nodes and initializers
    return sub, reads


def _train_block(graph: GraphModule, inputs, names, targets, epochs: int, seed: int,
                 precision: str = "fp32") -> tuple[float, float]:
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
    opt = torch.optim.Adam([{"params": [p], "lr": BLOCK_LEARNING_RATE * scales[n]} for n, p in graph.params.items()])
    passes = math.ceil(max(epochs * len(inputs), BLOCK_MIN_STEPS) / len(inputs)) if epochs else 0
    # from the per-layer fit, a warm start: no warm-up, the rate annealed (cosine) to zero
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(passes * len(inputs), 1))
    order = np.random.default_rng(seed)
    small = sum(p.numel() for p in graph.params.values()) < SMALL_MODEL_PARAMS
    with torch_threads(1 if small else None):
        before = error()
        start = {k: v.detach().clone() for k, v in graph.params.items()}
        for _ in range(passes if before > 0 else 0):  # outputs already exact (the new cores do not reach them)
            for i in order.permutation(len(inputs)):
                opt.zero_grad()
                with autocast(precision):
                    got = graph(inputs[i], names)
                _relative(got, targets[i]).backward()
                opt.step()
                schedule.step()
        # judged once at the end (the annealed rate ends near the best state): each
        # judgement costs a pass over the calibration data
        after = error() if passes and before > 0 else before
    if after >= before:
        with torch.no_grad():
            for k, v in start.items():
                graph.params[k].copy_(v)
        after = before
    return before, after
