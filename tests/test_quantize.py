"""quantize_ / lift_ao.quantize on tiny Hugging Face models."""

import copy

import pytest
import torch
from torchao.quantization import FqnToConfig, quantize_
from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2, token_batch

import lift_ao
from lift_ao import LiftQuantTensor, footprint, liftquant


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.double()


def _relative_error(model, reference, tokens):
    a, b = _logits(model, tokens), _logits(reference, tokens)
    return ((a - b).norm() / b.norm()).item()


def _quantized_names(model):
    return {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), LiftQuantTensor)}


def test_plain_quantize_swaps_every_linear_and_leaves_embeddings():
    model = tiny_llama()
    quantize_(model, liftquant(bits=2.4))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert _quantized_names(model) == linears  # torchao's default filter: lm_head included
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter
    assert not isinstance(model.model.embed_tokens.weight.data, LiftQuantTensor)


def test_output_error_decreases_with_bits():
    reference, tokens = tiny_llama(), token_batch()
    errors = {}
    for bits in (2.0, 2.4, 3.0):
        model = copy.deepcopy(reference)
        lift_ao.quantize(model, liftquant(bits=bits), progress=False)
        errors[bits] = _relative_error(model, reference, tokens)
    assert errors[2.0] > errors[2.4] > errors[3.0]
    assert errors[3.0] < 0.25 and errors[2.0] < 0.6


def test_lm_head_is_opt_in_and_filter_fn_narrows():
    model = tiny_llama()
    lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    assert "lm_head" not in _quantized_names(model) and len(_quantized_names(model)) == 14
    model = tiny_llama()
    lift_ao.quantize(model, liftquant(bits=2.4, include_lm_head=True), progress=False)
    assert "lm_head" in _quantized_names(model)
    model = tiny_llama()
    lift_ao.quantize(model, liftquant(bits=2.4), filter_fn=lambda m, name: "mlp" in name, progress=False)
    assert _quantized_names(model) == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}


def test_per_module_overrides_through_torchao_fqn_to_config():
    model = tiny_llama()
    config = FqnToConfig({r"re:.*\.mlp\..*": liftquant(bits=3.0), "_default": liftquant(bits=2.0)})
    quantize_(model, config, filter_fn=None)
    bits = {n: m.weight.code_bits / m.weight.block_size for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), LiftQuantTensor)}
    assert bits["model.layers.0.mlp.up_proj"] == 3.0 and bits["model.layers.1.self_attn.q_proj"] == 2.0


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_gpt2])
def test_other_architectures(build):
    reference, tokens = build(), token_batch()
    model = copy.deepcopy(reference)
    lift_ao.quantize(model, liftquant(bits=3.0), progress=False)
    assert len(_quantized_names(model)) >= 8
    assert _relative_error(model, reference, tokens) < 0.3


def test_siblings_share_rotation_and_footprint_is_exact():
    model = tiny_llama()
    dense_bytes = footprint(model)
    assert dense_bytes == sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.rotation_left.data_ptr() == attn.k_proj.weight.rotation_left.data_ptr()
    expected, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        parts = [getattr(t, n) for n in t.tensor_data_names] if isinstance(t, LiftQuantTensor) else [t]
        for p in parts:
            if p.untyped_storage().data_ptr() not in seen:
                seen.add(p.untyped_storage().data_ptr())
                expected += p.untyped_storage().nbytes()
    assert footprint(model) == expected < dense_bytes


def test_compiled_model_matches_eager():
    model, tokens = tiny_llama(), token_batch()
    lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-4)


def test_only_the_models_output_projection_is_kept_not_a_blocks_output_linear():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.output = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    class Model(torch.nn.Module):  # no get_output_embeddings: the top-level `output` is the head
        def __init__(self):
            super().__init__()
            self.block, self.output = Block(), torch.nn.Linear(64, 96)

    model = lift_ao.quantize(Model(), liftquant(lattice="24/10"), progress=False)
    assert isinstance(model.block.output.weight, LiftQuantTensor) and isinstance(model.block.dense.weight, LiftQuantTensor)
    assert not isinstance(model.output.weight, LiftQuantTensor)


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_the_codes_do_not_depend_on_the_default_dtype(default):
    """gpt-fast-style scripts set a bf16 default: the search's scratch tensors took it and met the float32
    lattice tables (a RuntimeError)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    expected = lift_ao.quantize(copy.deepcopy(model), liftquant(bits=2.4), progress=False)[0].weight
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = lift_ao.quantize(copy.deepcopy(model), liftquant(bits=2.4), progress=False)[0].weight
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got.packed_codes, expected.packed_codes) and torch.equal(got.row_scale, expected.row_scale)


def test_a_bad_layer_is_refused_before_any_layer_is_coded():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="2: weight has NaN/Inf"):
        lift_ao.quantize(model, liftquant(lattice="24/10"), progress=False)
    assert not any(isinstance(m.weight, LiftQuantTensor) for m in model)
