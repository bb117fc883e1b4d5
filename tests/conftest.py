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
