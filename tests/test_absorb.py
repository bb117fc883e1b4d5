"""Two features-first layers with elementwise ops between them keep the columns layout
(tnonnx/absorb.py): the Transposes between them go, the function stays, and anything the
rows layout is needed for (another reader, a constant along another axis) is left alone."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tnonnx
from onnx_builders import init, make_model, rel_err, run, value

N, H = 16, 24


def _ffn(batch_dims=(2, 5), tail=None, bias_shape=(H,), seed=0, computed_constant=False):
    """x -> MatMul -> Add bias -> GELU (erf form, as torch exports it) -> MatMul -> Add -> y;
    `tail` adds nodes reading the hidden tensor (`h`); `computed_constant` makes sqrt(2) a
    Sqrt of a Cast of an integer (as tnonnx's own GELU emission makes its constants)."""
    rng = np.random.default_rng(seed)
    inits = [init("w1", rng.standard_normal((N, H)).astype(np.float32) / 4),
             init("b1", rng.standard_normal(bias_shape).astype(np.float32)),
             init("w2", rng.standard_normal((H, N)).astype(np.float32) / 4),
             init("b2", rng.standard_normal(N).astype(np.float32)),
             init("one", np.array(1, np.float32)),
             init("half", np.array(0.5, np.float32))]
    if computed_constant:
        inits.append(init("two", np.array(2, np.int64)))
        nodes = [helper.make_node("Cast", ["two"], ["two_f"], to=TensorProto.FLOAT),
                 helper.make_node("Sqrt", ["two_f"], ["sqrt2"])]
    else:
        inits.append(init("sqrt2", np.array(np.sqrt(2), np.float32)))
        nodes = []
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["h"], name="bias1"),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["g0"]),
             helper.make_node("Mul", ["g0", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="bias2")]
    # a bias with more axes than x adds them to everything after it
    outputs = [value("y", [1] * (len(bias_shape) - len(batch_dims) - 1) + [*batch_dims, N])]
    if tail is not None:
        nodes += tail
        outputs.append(value("side", [*batch_dims, H]))
    return make_model(nodes, [value("x", [*batch_dims, N])], outputs, inits)


def _rewrite(model, absorb=True, **kw):
    kw = {"keep_columns": absorb, "format": "tt", "rank": 64, "emit": "features-first", "force": True,
          "timing": False, "validate": False, **kw}
    return tnonnx.rewrite(model, **kw)


def _feeds(model, seed=1):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _transposes(model) -> int:
    return sum(n.op_type == "Transpose" for n in model.graph.node)


@pytest.mark.parametrize("batch_dims", [(2, 5), (7,)])
def test_the_pair_keeps_columns_and_computes_the_same(batch_dims):
    model = _ffn(batch_dims)
    absorbed, report = _rewrite(model)
    assert any("keep their columns layout" in n for n in report.notes)
    onnx.checker.check_model(absorbed)
    feeds = _feeds(model)
    want = run(model, feeds)[0]
    got = run(absorbed, feeds)[0]
    assert rel_err(got, want) < 1e-5  # full rank: exact
    plain, plain_report = _rewrite(model, absorb=False)
    assert not any("keep their columns layout" in n for n in plain_report.notes)
    np.testing.assert_allclose(got, run(plain, feeds)[0], rtol=1e-5, atol=1e-6)
    assert _transposes(absorbed) == _transposes(plain) - 2
    # the bias in column form replaced the original; no stale constants or shape computations left
    names = {t.name for t in absorbed.graph.initializer}
    assert "b1" not in names and "b1_columns" in names
    used = {i for n in absorbed.graph.node for i in n.input} | {o.name for o in absorbed.graph.output}
    assert all(o in used for n in absorbed.graph.node for o in n.output)
    assert all(t.name in used for t in absorbed.graph.initializer)


def test_constants_computed_from_constants_count_as_constants():
    model = _ffn(computed_constant=True)
    absorbed, report = _rewrite(model)
    assert any("keep their columns layout" in n for n in report.notes)
    feeds = _feeds(model)
    assert rel_err(run(absorbed, feeds)[0], run(model, feeds)[0]) < 1e-5


def test_a_hidden_tensor_read_elsewhere_keeps_the_rows():
    side = [helper.make_node("Relu", ["h"], ["side"])]  # the pre-activation is read outside the pair
    model = _ffn(tail=side)
    absorbed, report = _rewrite(model, include="^fc")
    assert not any("keep their columns layout" in n for n in report.notes)
    feeds = _feeds(model)
    for got, want in zip(run(absorbed, feeds), run(model, feeds)):
        assert rel_err(got, want) < 1e-5


def test_a_constant_along_another_axis_keeps_the_rows():
    model = _ffn(bias_shape=(5, H))  # varies along the sequence too: no [H, 1] column form
    absorbed, report = _rewrite(model)
    assert not any("keep their columns layout" in n for n in report.notes)
    feeds = _feeds(model)
    assert rel_err(run(absorbed, feeds)[0], run(model, feeds)[0]) < 1e-5


def test_rows_first_layers_are_left_as_they_are():
    model = _ffn()
    absorbed, report = _rewrite(model, emit="matmul")
    assert not any("keep their columns layout" in n for n in report.notes)


def test_a_truncated_pair_stays_equal_to_its_rows_form():
    model = _ffn()
    feeds = _feeds(model)
    absorbed, _ = _rewrite(model, rank=3)
    plain, _ = _rewrite(model, rank=3, absorb=False)
    np.testing.assert_allclose(run(absorbed, feeds)[0], run(plain, feeds)[0], rtol=1e-5, atol=1e-6)
    assert rel_err(run(absorbed, feeds)[0], run(model, feeds)[0]) > 1e-3  # truncated indeed


def test_a_long_chain_of_elementwise_ops_is_looked_at_without_deep_recursion():
    from tnonnx.macs import constant_values, tensor_index

    nodes = [helper.make_node("Add", ["x" if k == 0 else f"a{k - 1}", "one"], [f"a{k}"]) for k in range(3000)]
    model = make_model(nodes, [value("x", [2, N])], [value("a2999", [2, N])],
                       [init("one", np.array(1, np.float32))])
    producer, _ = tensor_index(model.graph)
    constant = constant_values(model.graph, producer)
    assert constant("a2999") is None  # an activation, found out within a few steps
    assert float(constant("one")) == 1.0


def test_a_constant_with_more_axes_than_the_rows_keeps_the_rows():
    model = _ffn(bias_shape=(1, 1, 1, H))  # [1, 1, 1, H] + [2, 5, H] is [1, 2, 5, H]
    absorbed, report = _rewrite(model)
    assert not any("keep their columns layout" in n for n in report.notes)
    feeds = _feeds(model)
    got, want = run(absorbed, feeds)[0], run(model, feeds)[0]
    assert got.shape == want.shape == (1, 2, 5, N) and rel_err(got, want) < 1e-5


def test_a_hidden_tensor_read_in_a_nested_subgraph_keeps_the_rows():
    """`h` read two subgraph levels down (an If inside an If's branch) is read outside the pair."""
    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [value(out, [2, 5, H])])

    inner = helper.make_node("If", ["cond"], ["inner_out"], name="inner_if",
                             then_branch=branch("t2", [helper.make_node("Identity", ["h"], ["a"])], "a"),
                             else_branch=branch("e2", [helper.make_node("Identity", ["h"], ["b"])], "b"))
    outer = helper.make_node("If", ["cond"], ["side"], name="outer_if",
                             then_branch=branch("t1", [inner], "inner_out"),
                             else_branch=branch("e1", [helper.make_node(
                                 "Constant", [], ["c"], value=helper.make_tensor(
                                     "z", TensorProto.FLOAT, [2, 5, H], np.zeros(2 * 5 * H, np.float32)))], "c"))
    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    model = _ffn(tail=[cond, outer])
    absorbed, report = _rewrite(model, include="^fc")
    assert not any("keep their columns layout" in n for n in report.notes)
    feeds = _feeds(model)
    for got, want in zip(run(absorbed, feeds), run(model, feeds)):
        assert rel_err(got, want) < 1e-5
