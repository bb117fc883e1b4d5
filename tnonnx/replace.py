"""Putting replacements in place: each rewritten node swapped for the nodes emitted for it,
then the weight constants, pass-through nodes and graph inputs that nothing uses any more
removed (tnonnx.graph finds the layers and the tensors between a weight and its node)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from .macs import all_graphs, subgraphs

if TYPE_CHECKING:
    from .graph import Layer


def replace_nodes(model: onnx.ModelProto, replacements: dict[int, tuple[onnx.GraphProto, list, list]],
                  layers: list[Layer]) -> list[str]:
    """Swap each replaced node (keyed by id(node)) for its new nodes, in place and order;
    new initializers go to the main graph (visible from every subgraph). Then remove the
    weight constants and pass-through nodes that nothing uses any more, and the graph
    inputs that declared those constants (initializers listed as inputs, as IR 3 models
    do): returns the names of those inputs."""
    by_graph: dict[int, tuple[onnx.GraphProto, dict]] = {}
    for key, (graph, nodes, inits) in replacements.items():
        by_graph.setdefault(id(graph), (graph, {}))[1][key] = nodes
        model.graph.initializer.extend(inits)
    # subgraphs first: rebuilding a graph's node list copies its nodes, and with them the
    # bodies a replacement inside them would otherwise edit after they were copied
    order = {id(g): i for i, g in enumerate(all_graphs(model.graph))}
    for graph, table in sorted(by_graph.values(), key=lambda item: -order.get(id(item[0]), 0)):
        new_nodes = []
        for node in graph.node:
            new_nodes.extend(table.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(new_nodes)
    orphans = {t for layer in layers if id(layer.node) in replacements for t in layer.weight_path + layer.bias_path}
    removed = remove_unused(model.graph, orphans)
    _declare_domains(model, [n for _, nodes, _ in replacements.values() for n in nodes])
    return removed


def _declare_domains(model: onnx.ModelProto, nodes) -> None:
    """An opset import (version 1) for each custom domain the new nodes use and the model
    does not import yet (tnonnx's custom ops, --emit custom)."""
    known = {imp.domain for imp in model.opset_import}
    for node in nodes:
        if node.domain not in known and node.domain not in ("", "ai.onnx"):
            model.opset_import.add(domain=node.domain, version=1)
            known.add(node.domain)


def _used_names(graph: onnx.GraphProto, acc: set) -> set:
    for n in graph.node:
        acc.update(n.input)
        for g in subgraphs(n):
            _used_names(g, acc)
            acc.update(o.name for o in g.output)
    acc.update(o.name for o in graph.output)
    return acc


def remove_unused(root: onnx.GraphProto, candidates: set[str]) -> list[str]:
    """Drop initializers and nodes producing only `candidates` tensors once unused (and
    the graph inputs naming a dropped initializer); returns those inputs' names."""
    removed_inputs: list[str] = []
    while True:
        used = _used_names(root, set())
        dead = {c for c in candidates if c not in used}
        if not dead:
            return removed_inputs
        changed = False
        for graph in all_graphs(root):
            keep = [t for t in graph.initializer if t.name not in dead]
            if len(keep) != len(graph.initializer):
                gone = {t.name for t in graph.initializer} - {t.name for t in keep}
                del graph.initializer[:]
                graph.initializer.extend(keep)
                inputs = [i for i in graph.input if i.name not in gone]
                removed_inputs += [i.name for i in graph.input if i.name in gone]
                del graph.input[:]
                graph.input.extend(inputs)
                changed = True
            nodes = [n for n in graph.node if not (n.output and all(o in dead for o in n.output))]
            if len(nodes) != len(graph.node):
                del graph.node[:]
                graph.node.extend(nodes)
                changed = True
            vis = [v for v in graph.value_info if v.name not in dead]
            if len(vis) != len(graph.value_info):
                del graph.value_info[:]
                graph.value_info.extend(vis)
        candidates = candidates - dead
        if not changed:
            return removed_inputs
