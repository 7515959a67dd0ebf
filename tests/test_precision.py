"""flowgen is a guest: importing it changes no JAX config, and its simulations run in
float64 whatever the caller's setting."""

import subprocess
import sys

import jax
import numpy as np

import flowgen
from tests.conftest import ROOT


def test_import_leaves_jax_config_alone():
    code = (
        "import jax; before = jax.config.jax_enable_x64\n"
        "import flowgen, flowgen.runtime.validate, flowgen.runtime.stationary, flowgen.api\n"
        "import flowgen.problems, flowgen.runtime.central\n"
        "assert jax.config.jax_enable_x64 == before, 'flowgen changed jax_enable_x64'\n"
        "print('ok', before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok False")


def test_api_runs_in_float64_without_global_x64():
    with jax.enable_x64(False):
        res = flowgen.load(ROOT / "optimizers" / "gd.opt").run("quadratic", steps=10, lr=0.01)
        assert not jax.config.jax_enable_x64
    assert res.w_final["discrete"].dtype == np.float64
    # float32 would differ from float64 at ~1e-7; the run is reproducible to round-off
    again = flowgen.load(ROOT / "optimizers" / "gd.opt").run("quadratic", steps=10, lr=0.01)
    assert np.array_equal(res.w_final["discrete"], again.w_final["discrete"])
