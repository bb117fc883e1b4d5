"""ADMM rank-constrained training: the projection is the format's truncation, training under
the penalty brings the weights to the rank set, factorize() keeps the function there."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tnonnx.errors import TnonnxError
from tnonnx.formats import FORMATS, RankSpec
from tnonnx.nn import ADMM, FactorizedConv, FactorizedLinear


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small layers run many times slower on two contended threads than on one."""
    from tnonnx.fit import torch_threads

    with torch_threads(1):
        yield


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(),
                         nn.Linear(24, 16))


@pytest.mark.parametrize("fmt", ["tt", "svd", "tucker", "ht"])
def test_projection_is_the_format_truncation(fmt):
    net = small_net()
    admm = ADMM(net, format=fmt, rank=2)
    w = net[3].weight.detach()
    want = FORMATS[fmt].fit_dense(w.double().numpy().T, RankSpec(rank=2)).to_dense().T
    np.testing.assert_allclose(admm.project(w).numpy(), want, rtol=1e-5, atol=1e-6)
    k = net[0].weight.detach()
    want = FORMATS[fmt].fit_conv(k.double().numpy(), RankSpec(rank=2)).to_dense()
    np.testing.assert_allclose(admm.project(k).numpy(), want, rtol=1e-5, atol=1e-6)
    # Z starts at the projection, U at zero: the penalty is rho/2 ||W - Pi(W)||^2
    expected = sum(float(((layer.weight - admm.project(layer.weight)) ** 2).sum().detach())
                   for layer in (net[0], net[3], net[5]))
    assert float(admm.penalty().detach()) == pytest.approx(admm.rho / 2 * expected, rel=1e-4)


def test_distance_to_the_rank_set_shrinks_over_steps():
    net = small_net()
    teacher = small_net()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(128, 2, 4, 4)
    with torch.no_grad():
        y = teacher(x)
    admm = ADMM(net, format="tt", rank=2, rho=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    start = admm.distance()
    for _ in range(8):  # "epochs"
        for _ in range(15):
            opt.zero_grad()
            (((net(x) - y) ** 2).mean() + admm.penalty()).backward()
            opt.step()
        admm.step()
    end = admm.distance()
    assert set(start) == {"0", "3", "5"}
    for name in start:
        assert end[name] < 0.6 * start[name], (name, start[name], end[name])  # measured: 0.21, 0.56, 0.30


# (TR fitting is ALS, not a projection: a TR-rank-r weight is not always refitted exactly)
@pytest.mark.parametrize("fmt", ["tt", "tucker", "svd"])
def test_factorize_keeps_the_function_in_the_rank_set(fmt):
    net = small_net()
    admm = ADMM(net, format=fmt, rank=3, exclude="^5$")
    with torch.no_grad():
        for layer in admm.layers.values():
            layer.weight.copy_(admm.project(layer.weight, getattr(layer, "groups", 1)))
    assert max(admm.distance().values()) < 1e-5
    small = admm.factorize()
    assert isinstance(small[0], FactorizedConv) and isinstance(small[3], FactorizedLinear)
    assert isinstance(small[5], nn.Linear) and isinstance(net[3], nn.Linear)
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(small(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_factorize_into_a_given_model_chains_two_pulls():
    """Two ADMM pulls on one model (each its own format and rank), factorised into one copy."""
    net = small_net()
    first, second = ADMM(net, format="tt", rank=3, include="^0$"), ADMM(net, format="svd", rank=2, include="^3$")
    with torch.no_grad():
        for admm in (first, second):
            for layer in admm.layers.values():
                layer.weight.copy_(admm.project(layer.weight, getattr(layer, "groups", 1)))
    small = copy.deepcopy(net)
    assert second.factorize(first.factorize(small)) is small
    assert isinstance(small[0], FactorizedConv) and isinstance(small[3], FactorizedLinear)
    assert small[0].format == "tt" and small[3].format == "svd" and isinstance(small[5], nn.Linear)
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[3], nn.Linear)
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        np.testing.assert_allclose(small(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_step_updates_projection_and_dual():
    net = small_net()
    admm = ADMM(net, format="svd", rank=1)
    with torch.no_grad():
        net[5].weight.add_(1.0)
    w, u = net[5].weight.detach().clone(), admm.U["5"].clone()
    admm.step()
    z = admm.project(w + u)
    torch.testing.assert_close(admm.Z["5"], z)
    torch.testing.assert_close(admm.U["5"], u + w - z)


def test_bad_arguments():
    net = small_net()
    with pytest.raises(TnonnxError, match="no dense weight"):
        ADMM(net, format="ntt", rank=2)
    with pytest.raises(TnonnxError, match="rho"):
        ADMM(net, format="tt", rank=2, rho=0)
    with pytest.raises(TnonnxError, match="no Linear or Conv"):
        ADMM(net, format="tt", rank=2, include="nothing")
