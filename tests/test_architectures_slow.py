"""The central flow holds across architectures: RMSProp on every built-in network.

Each case is ``flowgen validate optimizers/rmsprop.opt --problem ARCH --restart-at
auto`` with the hyperparameters the registry suggests (those of the README's table,
``examples/architectures.py``), over the first ``HORIZON`` steps after the restart
(the README's table runs each to the registry's full ``steps``), and must pass
validate's own criteria: central distance ≤ 0.10 of the distance travelled, stable ≥
3 × central, loss prediction error ≤ 10 %.
"""

from __future__ import annotations

import pytest
from conftest import ROOT

import flowgen
from flowgen.problems import REGISTRY

# Steps compared after the restart (validate restarts 100 steps after the edge). The
# README's runs go 255–433 steps past it; 150 keeps all seven networks within CI's time.
HORIZON = 150
ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "lstm", "transformer", "mamba")


def test_every_built_in_network_is_validated_here():
    networks = {name for name, entry in REGISTRY.items() if "rmsprop" in entry.suggested}
    assert networks == set(ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rmsprop_central_flow_passes(arch):
    entry = REGISTRY[arch]
    sug = entry.suggested
    assert "rmsprop" in sug, f"the registry suggests no RMSProp setting for {arch}"
    full = int(sug.get("steps_rmsprop", sug["steps"]))
    steps = min(full, entry.eos_step["rmsprop"] + 100 + HORIZON)
    res = flowgen.load(ROOT / "optimizers" / "rmsprop.opt").validate(
        arch, steps=steps, restart_at="auto", eig_every=5, **sug["rmsprop"]
    )
    sm = res.summary
    assert res.eos_start is not None, f"{arch}: RMSProp never reached the edge"
    # the edge is measured every 5 steps: it may come a few steps after the registry's
    assert steps - res.restart_at >= min(HORIZON, full - res.restart_at) - 10
    assert sm["verdict"] == "pass", (arch, sm)
