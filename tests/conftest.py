import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# tests call the CLI in process: no persistent compilation cache in the user's home
# (tests/test_runtime.py checks the cache in a subprocess)
os.environ["FLOWGEN_COMPILE_CACHE"] = "off"

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


def _clear_caches():
    import sys

    caches = sys.modules.get("flowgen.runtime.caches")
    if caches is not None:  # a file that never touched the runtime leaves nothing to clear
        caches.clear_caches()


@pytest.fixture(autouse=True, scope="module")
def _fresh_caches():
    """Each test file starts with empty caches of compiled code. A worker runs many
    files; XLA maps every executable it keeps into memory (about 9 mappings each,
    thousands per validation). With every problem's executables kept, the slow
    suite's workers crashed inside an XLA compilation (segmentation fault) after
    half an hour, one of them measured at 18,859 mappings six minutes in and still
    growing, on the way to Linux's limit of 65,530 per process."""
    yield
    _clear_caches()


@pytest.fixture(autouse=True)
def _fresh_caches_after_slow_test(request):
    """A slow test is a whole validation of its own problem: clear after each one."""
    yield
    if request.node.get_closest_marker("slow") is not None:
        _clear_caches()
