"""`tnonnx rewrite --finetune N --admm`: ADMM rank-constrained training of the dense graph
(Yin et al. 2021, ALGORITHMS.md section 9) before the layers are fitted.

The original graph runs in torch (tnonnx/finetune.py's interpreter) with the selected
layers' weight initializers trainable. For N epochs over the calibration batches it is
distilled to the original's outputs (and the rewritten layers' inputs, as --finetune does)
under the penalty rho/2 sum_layers ||W - Z + U||^2 / ||W_0||^2, the projection step
Z <- Pi(W + U), U <- U + W - Z running after every epoch (tnonnx.nn.admm.Pull, the same
state tnonnx.nn.ADMM keeps). Pi is the layer's own fit (plan.fit_weight with its format,
rank rule, modes, order and format options) rebuilt to a dense weight: what the rewrite
will then fit is a weight already close to that set, so less is lost in the decomposition
and the fine-tuning that follows starts nearer the original.

Choices: each layer's term is divided by its initial squared norm, so that one rho serves
weights of any scale against the relative output error (RHO below; measured on LeNet-5 in
docs/RESULTS.md); the layers trained are those whose weight is a float initializer that
the node reads directly or transposed (Gemm transB); the others are fitted as they are,
and the report says which.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import TnonnxError
from .formats import is_nonlinear
from .plan import fit_weight

RHO = 1.0  # relative: see the module docstring


def _weight_initializer(layer, initializers: dict) -> tuple[str, bool] | None:
    """(initializer name, transposed) when the layer's canonical weight is that float
    initializer as stored or transposed; None otherwise."""
    if layer.weight is None or layer.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    for name in layer.node.input[:2]:
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            continue
        array = numpy_helper.to_array(tensor).astype(np.float64)
        if array.shape == layer.weight.shape and np.array_equal(array, layer.weight):
            return name, False
        if array.ndim == 2 and array.T.shape == layer.weight.shape and np.array_equal(array.T, layer.weight):
            return name, True
    return None


def check(format: str, spec, budget) -> None:
    """--admm's preconditions (one clear line each)."""
    if budget is not None or format == "auto":
        raise TnonnxError("--admm needs one format and a fixed rank rule (--rank, --ratio or --tol), "
                          "not --budget or --format auto")
    if is_nonlinear(format) or format == "adtn":
        raise TnonnxError(f"--admm: --format {format} has no truncation to project on; use a linear format "
                          "(svd, tt, tr, ht, tucker, cp, stt, str, sttu)")


def admm_train(model: onnx.ModelProto, original: onnx.ModelProto, plans, batches, *, epochs: int, rho: float,
               options: dict, hidden_weight: float, log=None, precision: str = "fp32") -> list[str]:
    """Trains the selected weights of `model` (a copy of `original`, the dense graph) in
    place, distilled to `original`, and sets each trained plan's layer weight to the result;
    returns report notes."""
    import torch

    from .finetune import finetune
    from .nn.admm import Pull

    if not rho > 0:
        raise TnonnxError(f"--admm-rho {rho:g}: must be > 0")
    initializers = {t.name: t for t in model.graph.initializer}
    found, left = {}, []
    for plan in plans:
        where = _weight_initializer(plan.layer, initializers)
        if where is None or where[0] in found:
            left.append(plan.layer.name)
        else:
            found[where[0]] = (plan, where[1])
    if not found:
        raise TnonnxError("--admm: no selected layer reads its weight from a float initializer")

    def project(name: str, w):
        plan, transposed = found[name]
        layer = plan.layer
        canonical = w.detach().double().numpy()
        canonical = canonical.T if transposed else canonical
        fact = fit_weight(plan.format, canonical, plan.spec, groups=layer.groups if layer.kind == "conv" else 1,
                          modes=plan.modes, order=plan.order, options=options)
        dense = fact.to_dense()
        return torch.as_tensor(np.ascontiguousarray(dense.T if transposed else dense), dtype=w.dtype)

    start = {name: torch.as_tensor(numpy_helper.to_array(initializers[name]).astype(np.float32)) for name in found}
    pull = Pull(start, project, rho, scales={n: 1.0 / max(float((w ** 2).sum()), 1e-30) for n, w in start.items()})
    before = pull.distance_of(start)
    hidden = [p.layer.x for p, _ in found.values()]
    _, error = finetune(model, original, batches, set(found), epochs=epochs, hidden=hidden,
                        hidden_weight=hidden_weight, log=log, penalty=pull.penalty_of, epoch_end=pull.step_of,
                        precision=precision)
    trained = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in found}
    after = pull.distance_of({n: torch.as_tensor(v.astype(np.float32)) for n, v in trained.items()})
    for name, (plan, transposed) in found.items():
        weight = trained[name].astype(np.float64)
        plan.layer.weight = weight.T if transposed else weight
        plan.layer.weight_key += ":admm"
    notes = [f"admm: {epochs} epoch(s) of the dense graph under the rank-set penalty (rho {rho:g}, relative), "
             f"distilled to the original: distance to the rank set {np.mean(list(before.values())):.4g} -> "
             f"{np.mean(list(after.values())):.4g} (mean of {len(found)} layer(s)); relative output error of the "
             f"trained dense graph {error:.4g}"]
    if left:
        notes.append(f"admm: {len(left)} layer(s) fitted without the ADMM phase (weight not a plain float "
                     f"initializer, or shared): {', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
    return notes
