import sys
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True, scope="session")
def single_threaded_blas():
    """Small SVDs run far slower multi-threaded in OpenBLAS, and collapse on a busy 2-core machine."""
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(autouse=True)
def predicted_timings(monkeypatch, tmp_path_factory):
    """Tests never time anything: the planner's default timer is the deterministic cost
    model, and the timing cache lives in a temporary folder. Tests of timing logic pass
    their own timer."""
    from tnonnx import latency

    monkeypatch.setattr(latency, "DEFAULT_TIMER", latency.CostModelTimer())
    monkeypatch.setenv("TNONNX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
