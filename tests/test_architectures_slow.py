"""The central flow holds across architectures: RMSProp on every built-in network.

Each case is ``flowgen validate optimizers/rmsprop.opt --problem ARCH --restart-at
auto`` with the steps and hyperparameters the registry suggests (those of the
README's table, ``examples/architectures.py``), and must pass validate's own
criteria: central distance ≤ 0.10 of the distance travelled, stable ≥ 3 × central,
loss prediction error ≤ 10 %.
"""

from __future__ import annotations

import pytest
from conftest import ROOT

import flowgen
from flowgen.problems import REGISTRY

# The architectures whose RMSProp validation at the registry's setting and the default
# configuration has been run and passed (examples/figures/architectures/table.md): all
# seven built-in networks.
ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "lstm", "transformer", "mamba")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rmsprop_central_flow_passes(arch):
    sug = REGISTRY[arch].suggested
    assert "rmsprop" in sug, f"the registry suggests no RMSProp setting for {arch}"
    steps = int(sug.get("steps_rmsprop", sug["steps"]))
    res = flowgen.load(ROOT / "optimizers" / "rmsprop.opt").validate(
        arch, steps=steps, restart_at="auto", eig_every=5, **sug["rmsprop"]
    )
    sm = res.summary
    assert res.eos_start is not None, f"{arch}: RMSProp never reached the edge"
    assert sm["verdict"] == "pass", (arch, sm)


def test_every_built_in_network_is_validated_here():
    """A new architecture in the registry must join the slow validation (fast check)."""
    networks = {
        name
        for name, entry in REGISTRY.items()
        if entry.alias_of is None and entry.data != "none"  # the quadratic has no network
    }
    assert networks == set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        sug = REGISTRY[arch].suggested
        assert "rmsprop" in sug and "rmsprop" in REGISTRY[arch].eos_step, arch
