"""Conv stages whose weights are contractions of small networks of labelled cores (HT's
subtrees; usable by any format whose stages are not trains). The ONNX graph stores, per
stage, the cores or the merged weight, whichever is smaller, like ConvStage.train: the
cores are merged in-graph by MatMuls over initializers, which ONNX Runtime folds at load."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import ConvFactorization, ConvStage


def contract(arrays: list, labels: list, out: tuple):
    """einsum over labelled cores, for numpy arrays and torch tensors alike."""
    letters = {l: chr(ord("a") + i) for i, l in enumerate(dict.fromkeys(x for ls in labels + [out] for x in ls))}
    eq = ",".join("".join(letters[l] for l in ls) for ls in labels) + "->" + "".join(letters[l] for l in out)
    if hasattr(arrays[0], "permute"):
        import torch

        return torch.einsum(eq, *arrays)
    return np.einsum(eq, *arrays, optimize=True)


@dataclass
class NetworkStage(ConvStage):
    """`train` lists the stage's cores, each sharing a label with one before it; the
    weight is their contraction over the shared labels, laid out as `out`, reshaped."""

    labels: dict = field(default_factory=dict)  # core key -> labels
    out: tuple = ()


def network_stage(keys: tuple, labels: dict, out: tuple, shape: tuple, spatial: bool) -> NetworkStage:
    labels = {key: tuple(labels[key]) for key in keys}

    def build(cores):
        return contract([cores[k] for k in keys], [labels[k] for k in keys], out).reshape(shape)

    return NetworkStage(build, spatial, tuple(keys), labels=labels, out=tuple(out))


@dataclass
class NetworkConvFactorization(ConvFactorization):
    def _merge_in_graph(self, builder, keys: tuple[str, ...], shape) -> str:
        """Pairwise MatMuls over the stage's cores, in `train` order."""
        stage = next(st for st in self.stages if st.train == keys)
        sizes = {l: n for key in keys for l, n in zip(stage.labels[key], self.cores[key].shape)}
        dims = lambda ls: [sizes[l] for l in ls]
        state, held = builder.weight(self.cores[keys[0]], "core"), list(stage.labels[keys[0]])
        for key in keys[1:]:
            labels = stage.labels[key]
            shared = [l for l in held if l in labels]
            free, new = [l for l in held if l not in labels], [l for l in labels if l not in shared]
            if free + shared != held:
                state = builder.op("Transpose", [state], "merge", perm=[held.index(l) for l in free + shared])
            c = math.prod(dims(shared))
            state = builder.op("Reshape", [state, builder.int64s([-1, c])], "merge")
            core = np.transpose(self.cores[key], [labels.index(l) for l in shared + new]).reshape(c, -1)
            state = builder.op("MatMul", [state, builder.weight(core, "core")], "merge")
            held = free + new
            state = builder.op("Reshape", [state, builder.int64s(dims(held))], "merge")
        if held != list(stage.out):
            state = builder.op("Transpose", [state], "merge", perm=[held.index(l) for l in stage.out])
        return builder.op("Reshape", [state, builder.int64s(list(shape))], "merge")
