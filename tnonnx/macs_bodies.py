"""MACs of If/Loop/Scan bodies as they run (tnonnx.macs's docstring says how): the If
branch that runs, else the larger one; Scan and Loop bodies once per iteration where the
trip count is known."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from .macs import ModelCost, _Scope, iter_nodes, subgraphs
from .macs_ops import _attr


def weigh_subgraphs(model, inferred, input_shapes, cost: ModelCost) -> int:
    """The model's MACs per run with If/Loop/Scan bodies counted as the module docstring
    says; scales ``per_node`` inside Scan/Loop bodies and fills ``cost.notes``."""
    keys = iter([key for key, _, _ in iter_nodes(inferred)])  # total() walks in the same order
    conditions = _if_conditions(model, inferred, input_shapes)
    scope = _Scope(inferred.graph, None, {})
    scope.values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.data_type in (TensorProto.INT64, TensorProto.INT32) and math.prod(t.dims) == 1}

    def total(graph, scale: int) -> int:
        out = 0
        for node in graph.node:
            key = next(keys)
            if key in cost.per_node:
                cost.per_node[key] *= scale
                out += cost.per_node[key]
            bodies = subgraphs(node)
            if not bodies:
                continue
            if node.op_type == "If" and len(bodies) == 2:
                branches = {a.name: total(a.g, scale) for a in node.attribute if a.type == AttributeProto.GRAPH}
                taken = conditions.get(node.input[0])
                if taken is None:
                    name = max(branches, key=branches.get)
                    how = "the larger branch, which one runs is not known"
                else:
                    name = "then_branch" if taken else "else_branch"
                    how = "the branch that runs on these inputs"
                out += branches[name]
                if any(branches.values()):
                    cost.notes.append(f"If {key}: MACs of its {name.split('_')[0]} branch counted ({how})")
                continue
            steps = _trip_count(node, scope)
            body = sum(total(g, scale * (steps or 1)) for g in bodies)
            out += body
            if body and node.op_type in ("Loop", "Scan"):
                cost.notes.append(f"{node.op_type} {key}: body MACs counted " + (
                    f"{steps} times (its trip count)" if steps else "once (trip count not known statically)"))
        return out

    return total(inferred.graph, 1)


def _trip_count(node, scope: _Scope) -> int | None:
    """Iterations of a Scan (the length of its first scanned input's axis) or a Loop (a
    constant trip count M), None when unknown."""
    if node.op_type == "Scan":
        n_scan = _attr(node, "num_scan_inputs", 0)
        if not n_scan:
            return None
        first = node.input[len(node.input) - n_scan]
        shape = scope.shape(first)
        axes = _attr(node, "scan_input_axes", None)
        axis = axes[0] if axes else 0
        return shape[axis] if shape else None
    if node.op_type == "Loop" and node.input and node.input[0]:
        m = scope.values.get(node.input[0])
        return int(m.reshape(-1)[0]) if m is not None and m.size == 1 else None
    return None


def _if_conditions(model, inferred, input_shapes) -> dict[str, bool]:
    """{condition tensor: value} for the main graph's If nodes whose condition is an
    initializer, or computed and read off one ONNX Runtime run on random inputs (nothing
    for those when the run fails)."""
    inits = {t.name: t for t in model.graph.initializer}
    conditions, computed = {}, set()
    for node in model.graph.node:
        if node.op_type == "If":
            name = node.input[0]
            if name in inits:
                conditions[name] = bool(onnx.numpy_helper.to_array(inits[name]).reshape(-1)[0])
            else:
                computed.add(name)
    if computed:
        from . import calibrate, runtime

        m, wanted = runtime.with_outputs(model, sorted(computed), inferred, inputs=False)
        try:
            sess = runtime.session(m, optimize=False)
            values = sess.run(wanted, calibrate.random_feeds(model, shapes=input_shapes))
            conditions.update({n: bool(np.asarray(v).reshape(-1)[0]) for n, v in zip(wanted, values)})
        except Exception:  # noqa: BLE001 - unknown conditions count the larger branch
            pass
    return conditions
