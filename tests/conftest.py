import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = sorted((ROOT / "optimizers").glob("*.opt"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _float64():
    """Unit tests call flowgen's internals directly: give them float64 for the session
    (flowgen itself never sets JAX's global config; tests/test_precision.py checks the API
    without this)."""
    from flowgen.precision import float64

    with float64():
        yield
