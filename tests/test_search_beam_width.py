"""The beam width option flows config → quantize → encode → nearest_codes, and is validated."""

import pytest
import torch
from torchao.quantization import quantize_

import lift_ao
from lift_ao import Lattice, LiftQuantTensor, liftquant
from lift_ao.search import default_beam_width


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(40, 6, bias=False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "64", True])
def test_bad_beam_width_raises(bad):
    with pytest.raises(ValueError, match="beam_width must be a positive int"):
        liftquant(bits=2.4, beam_width=bad)
    with pytest.raises(ValueError, match="beam_width must be a positive int"):
        lift_ao.LiftQuantConfig(lattice="24/10", beam_width=bad)


def test_config_beam_width_reaches_the_search():
    lattice = Lattice.load("24/10")
    weight = _linear().weight.detach()
    narrow, default = liftquant(lattice="24/10", beam_width=1), liftquant(lattice="24/10")
    assert default.beam_width is None and narrow.beam_width == 1
    by_config = {}
    for name, config in (("narrow", narrow), ("default", default)):
        model = torch.nn.Sequential(_linear())
        quantize_(model, config)
        by_config[name] = model[0].weight
    expected_narrow = LiftQuantTensor.from_hp(weight, lattice, beam_width=1)
    expected_default = LiftQuantTensor.from_hp(weight, lattice, beam_width=default_beam_width(lattice))
    assert torch.equal(by_config["narrow"].packed_codes, expected_narrow.packed_codes)
    assert torch.equal(by_config["default"].packed_codes, expected_default.packed_codes)
    assert not torch.equal(expected_narrow.packed_codes, expected_default.packed_codes)
    # K = 1 (greedy) codes this weight worse than the default K.
    err = {k: float((t.dequantize() - weight).square().sum()) for k, t in by_config.items()}
    assert err["default"] < err["narrow"]


def test_default_beam_width_per_lattice():
    # D ≥ 40: wider beam (benchmarks/results/encode_beam_cpu.md); smaller D unchanged at 32.
    assert default_beam_width(Lattice.load("24/10")) == 32
    assert default_beam_width(Lattice.load("32/10")) == 32
    assert default_beam_width(Lattice.load("48/20")) == 64
    assert default_beam_width(Lattice.load("40/16")) == 64
    stored = Lattice(4, 8, torch.eye(4, 8), metadata={"beam_width": "7"})
    assert default_beam_width(stored) == 7
