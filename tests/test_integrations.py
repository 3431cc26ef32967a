"""Hugging Face save_pretrained/from_pretrained, torchtune and torchchat entry points.

Models are built from configs with fixed seeds (no downloads); every round trip is checked for
bit-identical tensors and logits. One decoder layer and 2.4 bits keep encoding under a few seconds.
"""

import importlib
import importlib.util
import json
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lift_ao
from lift_ao.integrations.hf import LiftQuantHfConfig, enable_save_pretrained
from lift_ao.packing import row_words
from lift_ao.integrations.torchchat import TORCHCHAT_KEY, LiftQuantHandler, register_with_torchchat
from lift_ao.integrations.torchtune import TORCHTUNE_MODE, LiftQuantQuantizer, register_with_torchtune

VOCAB = 64
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens())
    return out.logits if hasattr(out, "logits") else out


def llama_linears(model: LlamaForCausalLM) -> dict[str, nn.Linear]:
    layer = model.model.layers[0]
    return {name: getattr(layer.self_attn, name, None) or getattr(layer.mlp, name) for name in LINEAR_NAMES}


def assert_same_weight(a: lift_ao.LiftQuantTensor, b: lift_ao.LiftQuantTensor):
    assert isinstance(a, lift_ao.LiftQuantTensor) and isinstance(b, lift_ao.LiftQuantTensor)
    assert a.shape == b.shape and a.dtype == b.dtype
    for name in a.tensor_data_names:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----- Hugging Face ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A float32 tiny Llama checkpoint written with save_pretrained."""
    path = tmp_path_factory.mktemp("llama_fp")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded_quantized(fp_dir):
    """The checkpoint quantized on load by transformers through our quantizer."""
    return AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LiftQuantHfConfig(bits=2.4))


def test_hf_quantize_on_load_equals_lift_ao_quantize(loaded_quantized):
    reference = lift_ao.quantize(tiny_llama(), lift_ao.liftquant(bits=2.4), progress=False)
    for name, module in llama_linears(loaded_quantized).items():
        assert_same_weight(module.weight, llama_linears(reference)[name].weight)
    assert type(loaded_quantized.lm_head.weight) is nn.Parameter  # output projection kept
    assert torch.equal(loaded_quantized.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(logits(loaded_quantized), logits(reference))


def test_hf_save_pretrained_round_trip_is_exact(loaded_quantized, tmp_path):
    loaded_quantized.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "liftquant" and saved["bits"] == 2.4
    assert not list(tmp_path.glob("*.bin"))  # safetensors only, no pickle
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    q_proj = "model.layers.0.self_attn.q_proj."
    assert {q_proj + f"weight_{n}" for n in lift_ao.LiftQuantTensor.tensor_data_names} <= keys
    assert q_proj + "weight" not in keys and "lm_head.weight" in keys

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, module in llama_linears(reloaded).items():
        assert_same_weight(module.weight, llama_linears(loaded_quantized)[name].weight)
    assert torch.equal(logits(reloaded), logits(loaded_quantized))
    assert isinstance(reloaded.config.quantization_config, LiftQuantHfConfig)
    # Layers reading the same activation share one rotation and lattice matrix again after loading.
    attention = reloaded.model.layers[0].self_attn
    assert attention.q_proj.weight.rotation_left is attention.v_proj.weight.rotation_left
    assert attention.q_proj.weight.mapping is attention.o_proj.weight.mapping

    # A loaded pre-quantized model saves again (transformers must not try to reverse our load step).
    reloaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again), logits(loaded_quantized))


def test_hf_save_pretrained_after_save_and_load_quantized(loaded_quantized, tmp_path):
    """A model quantized on load, saved with save_quantized and loaded with load_quantized had no
    hf_quantizer although config.json said liftquant: save_pretrained failed in safetensors ("invalid
    python storage")."""
    lift_ao.save_quantized(loaded_quantized, tmp_path / "lift_ao")
    lift_ao.load_quantized(tmp_path / "lift_ao").save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), logits(loaded_quantized))
    # Into a model given to load into, whose config records nothing: the directory's config.json does.
    plain = {k: v for k, v in loaded_quantized.config.to_dict().items() if k != "quantization_config"}
    given = lift_ao.load_quantized(tmp_path / "lift_ao", LlamaForCausalLM(LlamaConfig(**plain)))
    given.save_pretrained(tmp_path / "given")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "given")), logits(loaded_quantized))
    # A quantization_config this lift_ao cannot read (a newer one's field) still loads, with a warning.
    config = json.loads((tmp_path / "lift_ao" / "config.json").read_text())
    config["quantization_config"]["future_field"] = 1
    (tmp_path / "lift_ao" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="saves with lift_ao.save_quantized"):
        assert torch.equal(logits(lift_ao.load_quantized(tmp_path / "lift_ao")), logits(loaded_quantized))


def test_hf_format_2_codes_load_by_exact_regrouping(loaded_quantized, tmp_path):
    """save_pretrained output of lift_ao's format 2 (code rows one after another) loads bit-exactly."""
    loaded_quantized.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    for key in [k for k in tensors if k.endswith("weight_packed_codes")]:
        tensors[key] = row_words(tensors[key], tensors[key.replace("packed_codes", "row_scale")].shape[0]).contiguous()
    save_file(tensors, path, metadata=metadata)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, module in llama_linears(reloaded).items():
        assert_same_weight(module.weight, llama_linears(loaded_quantized)[name].weight)


def test_hf_truncated_checkpoint_is_refused(loaded_quantized, tmp_path):
    loaded_quantized.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.0.mlp.up_proj.weight_row_scale"}
        metadata = f.metadata()
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(RuntimeError, match="conversion of the weights"):  # transformers logs our reason first
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_hf_save_pretrained_after_lift_ao_quantize_with_mixed_lattices(tmp_path):
    # Each weight stores its own lattice matrix, so per-layer widths (what a memory budget plans) load too.
    config = lift_ao.liftquant(bits=2.4)
    model = lift_ao.quantize(tiny_llama(), lift_ao.liftquant(lattice="16/8"), lambda _, name: ".mlp." in name,
                             progress=False)
    lift_ao.quantize(model, config, progress=False)
    expected = logits(model)
    enable_save_pretrained(model, config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["lattice"] == config.lattice and saved["bits"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {name: m.weight.lattice.name for name, m in llama_linears(reloaded).items()} == {
        name: "16/8" if name in ("gate_proj", "up_proj", "down_proj") else config.lattice for name in LINEAR_NAMES
    }
    assert torch.equal(logits(reloaded), expected)


def test_hf_save_pretrained_after_lift_ao_quantize_with_a_memory_budget_needs_no_other_call(tmp_path):
    """lift_ao.quantize attaches the hf_quantizer itself: save_pretrained failed in safetensors ("invalid
    python storage") unless enable_save_pretrained was called first. A budget plan's per-layer lattices are
    recorded as the budget; the checkpoint's weights each carry their lattice, so they load as planned."""
    config = lift_ao.liftquant(memory_budget=27000)  # tiny_llama's plan at 27000 bytes: 21/6 and 22/6
    model = lift_ao.quantize(tiny_llama(), config, progress=False)
    planned = {name: m.weight.lattice.name for name, m in llama_linears(model).items()}
    assert len(set(planned.values())) > 1
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["memory_budget"] == 27000 and saved["lattice"] is None and saved["bits"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, module in llama_linears(reloaded).items():
        assert_same_weight(module.weight, llama_linears(model)[name].weight)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(logits(reloaded), logits(model))


def test_hf_save_pretrained_after_lift_ao_calibrate_needs_no_other_call(tmp_path):
    """lift_ao.calibrate attaches the hf_quantizer as lift_ao.quantize does (was: save_pretrained failed in
    safetensors); its per-group signs load back bit for bit."""
    from tiny_models import token_batch

    model = tiny_llama()
    tokens = token_batch(0, batch=4, length=16, vocab=model.config.vocab_size)
    model = lift_ao.calibrate(model, lift_ao.liftquant(lattice="24/10"), tokens, progress=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["lattice"] == "24/10"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, module in llama_linears(reloaded).items():
        assert_same_weight(module.weight, llama_linears(model)[name].weight)
    assert torch.equal(logits(reloaded), logits(model))


def test_hf_a_quantized_model_with_adapters_passes_the_trainer_s_check_and_backpropagates(monkeypatch):
    """The attached hf_quantizer says trainable (it said not, so transformers' Trainer refused LoRA on a model
    lift_ao.quantize coded); gradients reach the activations through every LiftQuant layer, to the input."""
    import transformers.trainer_utils as trainer_utils

    model = lift_ao.quantize(tiny_llama(), lift_ao.liftquant(bits=2.4), progress=False)
    monkeypatch.setattr(trainer_utils, "_is_peft_model", lambda m: True)  # as if peft wrapped it with adapters
    trainer_utils.validate_quantization_for_training(model)
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3, 4]])).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0 and torch.isfinite(embeds.grad).all()


def test_hf_save_pretrained_after_lift_ao_quantize_refuses_what_from_pretrained_could_not_load(tmp_path):
    """GPT-2's Conv1D layers (lift_ao.quantize makes them nn.Linear; from_pretrained rebuilds Conv1D) and a
    quantized head that config.json ties: save_pretrained names lift_ao.save_quantized before writing
    anything, instead of failing in safetensors or writing a checkpoint that loads wrong."""
    from tiny_models import tiny_gpt2
    from tiny_models import tiny_llama as tied_llama

    gpt2 = lift_ao.quantize(tiny_gpt2(), lift_ao.liftquant(bits=2.4), progress=False)
    with pytest.raises(ValueError, match=r"Conv1D layers .*lift_ao.save_quantized"):
        gpt2.save_pretrained(tmp_path / "gpt2")
    tied = lift_ao.quantize(tied_llama(tie=True), lift_ao.liftquant(bits=2.4, include_lm_head=True), progress=False)
    assert isinstance(tied.lm_head.weight, lift_ao.LiftQuantTensor)
    with pytest.raises(ValueError, match=r"ties it to the input embedding.*lift_ao.save_quantized"):
        tied.save_pretrained(tmp_path / "tied")
    assert not (tmp_path / "gpt2" / "config.json").exists() and not (tmp_path / "tied" / "config.json").exists()


def test_hf_bad_input_names_the_fix(fp_dir):
    with pytest.raises(ValueError, match="exactly one of bits"):
        LiftQuantHfConfig()
    with pytest.raises(TypeError, match="upgrade lift_ao"):
        LiftQuantHfConfig.from_dict({"quant_method": "liftquant", "bits": 2.4, "group_size": 64})
    with pytest.raises(ValueError, match=r"lift_ao.quantize\(model, lift_ao.liftquant\(memory_budget"):
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=LiftQuantHfConfig(memory_budget=10**6))
    with pytest.raises(ValueError, match="run lift_ao.quantize"):
        enable_save_pretrained(tiny_llama(), lift_ao.liftquant(bits=2.4))


def test_hf_save_pretrained_refuses_what_from_pretrained_could_not_load():
    """A quantized head tied in config.json (torchao's quantize_ has no names, so it codes SmolLM2's), and
    GPT-2's Conv1D layers: both were saved, then failed to load (aten.equal on a LiftQuantTensor; no loader)."""
    from torchao.quantization import quantize_

    from tiny_models import tiny_gpt2
    from tiny_models import tiny_llama as tied_llama

    config = lift_ao.liftquant(bits=2.4)
    tied = tied_llama(tie=True)
    quantize_(tied, config)
    assert isinstance(tied.lm_head.weight, lift_ao.LiftQuantTensor)
    with pytest.raises(ValueError, match="ties it to the input embedding"):
        enable_save_pretrained(tied, config)
    gpt2 = lift_ao.quantize(tiny_gpt2(), config, progress=False)
    with pytest.raises(ValueError, match="are transformers Conv1D layers"):
        enable_save_pretrained(gpt2, config)
    kept = lift_ao.quantize(tied_llama(tie=True), config, progress=False)  # the head kept: accepted
    assert enable_save_pretrained(kept, config) is kept


# ----- torchtune / torchchat-shaped models ----------------------------------------------------


class TinyDecoder(nn.Module):
    """A decoder with torchtune's or torchchat's module names (one layer, causal attention, SwiGLU)."""

    def __init__(self, names: dict[str, str], seed: int, dim: int = 16, hidden: int = 48, heads: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.names, self.heads = names, heads
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        attention = nn.Module()
        for key in ("q", "k", "v", "o"):
            setattr(attention, names[key], nn.Linear(dim, dim, bias=False))
        mlp = nn.Module()
        mlp.w1, mlp.w2, mlp.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), nn.Linear(
            dim, hidden, bias=False
        )
        layer = nn.Module()
        setattr(layer, names["attention"], attention)
        setattr(layer, names["mlp"], mlp)
        self.layers = nn.ModuleList([layer])
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(token_ids)  # (batch, seq, dim)
        for layer in self.layers:
            attention, mlp = getattr(layer, self.names["attention"]), getattr(layer, self.names["mlp"])
            q, k, v = (getattr(attention, self.names[key])(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                       for key in ("q", "k", "v"))
            mixed = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            x = x + getattr(attention, self.names["o"])(mixed)
            x = x + mlp.w2(nn.functional.silu(mlp.w1(x)) * mlp.w3(x))
        return self.output(self.norm(x))


TORCHTUNE_NAMES = {"attention": "attn", "mlp": "mlp", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "output_proj"}
TORCHCHAT_NAMES = {"attention": "attention", "mlp": "feed_forward", "q": "wq", "k": "wk", "v": "wv", "o": "wo"}


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if isinstance(p, lift_ao.LiftQuantTensor)}


@pytest.fixture(scope="module")
def tune_quantized():
    """A torchtune-shaped decoder after ``LiftQuantQuantizer(bits=2.4).quantize``."""
    model = TinyDecoder(TORCHTUNE_NAMES, seed=0)
    assert LiftQuantQuantizer(bits=2.4).quantize(model) is model
    return model


def test_torchtune_quantizer_quantizes_the_decoder_and_keeps_output(tune_quantized):
    assert quantized_names(tune_quantized) == {
        f"layers.0.{part}.weight" for part in
        ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3"]
    }
    reference = lift_ao.quantize(TinyDecoder(TORCHTUNE_NAMES, seed=0), lift_ao.liftquant(bits=2.4), progress=False)
    assert torch.equal(logits(tune_quantized), logits(reference))


def test_torchtune_recipe_flow_quantize_save_then_load_into_fresh_model(tune_quantized, tmp_path):
    # The quantize recipe saves the quantized state dict; generate/eval build a fresh (random) model,
    # quantize it for structure, then load_state_dict(assign=True).
    torch.save(tune_quantized.state_dict(), tmp_path / "model.pt")
    fresh = LiftQuantQuantizer(bits=2.4).quantize(TinyDecoder(TORCHTUNE_NAMES, seed=7))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), assign=True)
    assert torch.equal(logits(fresh), logits(tune_quantized))


def test_torchtune_component_path_instantiates():
    # torchtune's config.instantiate imports the module of `_component_` and calls the attribute.
    component = {"_component_": "lift_ao.integrations.torchtune.LiftQuantQuantizer", "bits": 2.4}
    module_path, _, name = component["_component_"].rpartition(".")
    quantizer = getattr(importlib.import_module(module_path), name)(bits=component["bits"])
    assert quantizer.config.lattice == lift_ao.liftquant(bits=2.4).lattice


def test_torchtune_mode_registration(monkeypatch):
    # torchtune 0.6.1 does not import against torchao 0.18, so its table is stood in for by a module
    # with torchtune's names (`training.quantization._quantizer_to_mode`, looked up by type).
    fake_quantization = types.ModuleType("torchtune.training.quantization")
    fake_quantization._quantizer_to_mode = {}
    fake_training = types.ModuleType("torchtune.training")
    fake_training.quantization = fake_quantization
    monkeypatch.setitem(sys.modules, "torchtune", types.ModuleType("torchtune"))
    monkeypatch.setitem(sys.modules, "torchtune.training", fake_training)
    monkeypatch.setitem(sys.modules, "torchtune.training.quantization", fake_quantization)
    assert register_with_torchtune()
    assert fake_quantization._quantizer_to_mode[type(LiftQuantQuantizer(bits=2.4))] == TORCHTUNE_MODE


def test_torchchat_json_dispatch_quantizes_like_lift_ao():
    # torchchat's quantize_model: parse the JSON, look each key up in the handler table, build the
    # handler with device/precision plus the JSON options, then `model = handler.quantize(model)`.
    table = register_with_torchchat({})
    model = TinyDecoder(TORCHCHAT_NAMES, seed=0)
    for key, options in json.loads('{"linear:liftquant": {"bits": 2.4}}').items():
        model = table[key](device="cpu", precision=torch.float32, **options).quantize(model)
    assert key == TORCHCHAT_KEY
    assert quantized_names(model) == {
        f"layers.0.{part}.weight" for part in
        ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
         "feed_forward.w3"]
    }
    reference = lift_ao.quantize(TinyDecoder(TORCHCHAT_NAMES, seed=0), lift_ao.liftquant(bits=2.4), progress=False)
    assert torch.equal(logits(model), logits(reference))


def test_torchchat_keeps_the_output_head_of_its_wrapped_transformer():
    """torchchat quantizes its Model, which holds the Transformer as `model` (its head: `model.output`)."""
    class Wrapped(nn.Module):  # torchchat/model.py: Model.__init__ sets self.model = self.build_model()
        def __init__(self):
            super().__init__()
            self.model = TinyDecoder(TORCHCHAT_NAMES, seed=0)

        def forward(self, token_ids):
            return self.model(token_ids)

    model = register_with_torchchat({})[TORCHCHAT_KEY](device="cpu", precision=torch.float32, bits=2.4).quantize(Wrapped())
    assert not isinstance(model.model.output.weight, lift_ao.LiftQuantTensor) and len(quantized_names(model)) == 7
    reference = lift_ao.quantize(TinyDecoder(TORCHCHAT_NAMES, seed=0), lift_ao.liftquant(bits=2.4), progress=False)
    assert torch.equal(logits(model), logits(reference))


def test_torchchat_and_torchtune_reject_bad_options():
    with pytest.raises(ValueError, match="exactly one of bits"):
        LiftQuantHandler(device="cpu", bits=2.4, lattice="24/10")
    with pytest.raises(ValueError, match="exactly one of bits"):
        LiftQuantQuantizer()
    if importlib.util.find_spec("torchchat") is None:
        with pytest.raises(ImportError, match="pass the table"):
            register_with_torchchat()
