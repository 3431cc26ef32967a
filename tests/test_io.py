"""save_quantized / load_quantized: bit-exact round trip and refusal of bad checkpoints."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from checks import assert_bit_identical
from tiny_models import tiny_gpt2, tiny_llama, token_batch

import lift_ao
from lift_ao import CheckpointError, liftquant, load_quantized, save_quantized
from lift_ao.io import CHECKPOINT_NAME, FORMAT_VERSION, _sha256
from lift_ao.packing import row_words


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama(tie=True)
    lift_ao.quantize(model, liftquant(bits=2.4), progress=False)
    directory = tmp_path_factory.mktemp("ckpt")
    save_quantized(model, directory)
    return model, directory


def _tensors(src):
    with safe_open(str(src / CHECKPOINT_NAME), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, edit_tensors=lambda t: t, edit_header=lambda h: h):
    with safe_open(str(src / CHECKPOINT_NAME), framework="pt") as f:
        header = json.loads(f.metadata()["lift_ao"])
    tensors = _tensors(src)
    dst.mkdir(exist_ok=True)
    save_file(edit_tensors(tensors), str(dst / CHECKPOINT_NAME), metadata={"lift_ao": json.dumps(edit_header(header))})
    return dst


def test_round_trip_is_bit_exact_with_identical_outputs(saved):
    model, directory = saved
    loaded = load_quantized(directory, tiny_llama(seed=1, tie=True))
    assert_bit_identical(model, loaded)
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    # Tied embeddings share storage again, and so do the transforms of layers reading one activation.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    attention = loaded.model.layers[0].self_attn
    q_proj, k_proj = attention.q_proj.weight, attention.k_proj.weight
    assert q_proj.rotation_left.data_ptr() == k_proj.rotation_left.data_ptr()
    assert q_proj.mapping.data_ptr() == loaded.model.layers[1].mlp.down_proj.weight.mapping.data_ptr()
    assert lift_ao.footprint(loaded) == lift_ao.footprint(model)
    assert not list(directory.glob("*.tmp"))


def test_a_compiled_model_saves_and_loads_as_the_module_it_wraps(saved, tmp_path):
    """torch.compile's wrapper prefixed every key with `_orig_mod.`: a checkpoint nothing could load."""
    model, _ = saved
    save_quantized(torch.compile(model), tmp_path)
    assert_bit_identical(model, load_quantized(tmp_path, tiny_llama(seed=1, tie=True)))
    target = torch.compile(tiny_llama(seed=1, tie=True))
    assert load_quantized(tmp_path, target) is target
    assert_bit_identical(model, target._orig_mod)


def test_a_checkpoint_saved_from_a_compiled_model_before_it_was_unwrapped_loads(saved, tmp_path, monkeypatch):
    """Its keys carry the wrapper's `_orig_mod.` prefix; it loaded into a compiled model, and must still."""
    import lift_ao.io as io

    model, _ = saved
    with monkeypatch.context() as patch:
        patch.setattr(io, "_module_of", lambda m, what: m)  # save_quantized as it was
        save_quantized(torch.compile(model), tmp_path)
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        assert all(key.startswith("_orig_mod.") for key in f.keys())
    for target in (None, tiny_llama(seed=1, tie=True), torch.compile(tiny_llama(seed=1, tie=True))):
        loaded = load_quantized(tmp_path, target)
        assert_bit_identical(model, getattr(loaded, "_orig_mod", loaded))


def test_load_rebuilds_hf_architecture_from_saved_config(saved):
    model, directory = saved
    loaded = load_quantized(directory)
    tokens = token_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_truncated_file_is_refused(saved, tmp_path):
    _, directory = saved
    data = (directory / CHECKPOINT_NAME).read_bytes()
    (tmp_path / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_tampered_tensor_is_refused(saved, tmp_path):
    def flip_one_bit(tensors):
        key = next(k for k in tensors if k.endswith("packed_codes"))
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] ^= 1
        return tensors

    _rewrite(saved[1], tmp_path, edit_tensors=flip_one_bit)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_a_part_relabelled_with_another_dtype_is_refused(saved, tmp_path):
    """The SHA-256s cover the bytes only: float32 row scales relabelled int32 (same bytes, same digest)."""
    def relabel(tensors):
        key = next(k for k in tensors if k.endswith("row_scale"))
        tensors[key] = tensors[key].view(torch.int32)
        return tensors

    _rewrite(saved[1], tmp_path, edit_tensors=relabel)
    with pytest.raises(CheckpointError, match="codes must be int32, the rest float32"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_tied_parameters_stay_one_through_two_round_trips(saved, tmp_path):
    model, directory = saved
    loaded = load_quantized(directory, tiny_llama(seed=1, tie=True))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    save_quantized(loaded, tmp_path)  # stored once again, not as two tensors
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        assert json.loads(f.metadata()["lift_ao"])["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    again = load_quantized(tmp_path, tiny_llama(seed=1, tie=True))
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert_bit_identical(model, again)


def test_scalar_buffers_load_and_the_file_follows_the_umask(tmp_path):
    def model(temperature):
        m = torch.nn.Sequential(torch.nn.Linear(64, 64))
        m.register_buffer("temperature", torch.tensor(temperature))
        return m

    quantized = lift_ao.quantize(model(0.7), liftquant(bits=2.4), progress=False)
    umask = os.umask(0o022)
    try:
        save_quantized(quantized, tmp_path)
    finally:
        os.umask(umask)
    assert (tmp_path / CHECKPOINT_NAME).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert torch.equal(load_quantized(tmp_path, model(0.0)).temperature, torch.tensor(0.7))


class CachedRotary(torch.nn.Module):
    """torchtune's RotaryPositionalEmbeddings' way: a cos table computed at construction and kept as a
    non-persistent buffer (in no checkpoint), here one table that two blocks hold."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        cache = torch.cos(torch.outer(torch.arange(12.0), torch.arange(64.0) / 64))  # (positions, dim)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(2)])
        for block in self.blocks:
            block.register_buffer("cache", cache, persistent=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_load_to_a_device_moves_the_buffers_no_checkpoint_holds(saved, tmp_path):
    """load_quantized(device=...) moved the checkpoint's tensors but not the buffers the model computes (HF's
    rotary inv_freq, torchtune's RoPE cache): a forward on the device mixed devices."""
    model, directory = saved
    rotary = lift_ao.quantize(CachedRotary(seed=0), liftquant(bits=2.4), progress=False)
    save_quantized(rotary, tmp_path)
    pairs = [(model, load_quantized(directory, device="cuda")),  # built from config.json on the CPU
             (rotary, load_quantized(tmp_path, CachedRotary(seed=1), device="cuda"))]
    for source, loaded in pairs:
        assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"cuda"}
        assert_bit_identical(copy.deepcopy(source).cuda(), loaded)
        for name, buffer in source.named_buffers():  # those no checkpoint holds too
            assert torch.equal(loaded.get_buffer(name).cpu(), buffer), name
    hf, rotary = pairs[0][1], pairs[1][1]
    attention = hf.model.layers[0].self_attn
    assert attention.q_proj.weight.rotation_left is attention.k_proj.weight.rotation_left  # still shared
    assert rotary.blocks[0].cache is rotary.blocks[1].cache  # moved once: still one table


@pytest.mark.parametrize("into", ["saved config", "a GPT-2 model"])
def test_gpt2_conv1d_layers_load_as_they_were_quantized(tmp_path, into):
    """quantize turns GPT-2's Conv1D (weight (in, out)) into nn.Linear; the load does the same."""
    model = lift_ao.quantize(tiny_gpt2(), liftquant(bits=2.4), progress=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, None if into == "saved config" else tiny_gpt2(seed=1))
    assert_bit_identical(model, loaded)
    tokens = token_batch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_wrong_format_version_is_refused(saved, tmp_path):
    _rewrite(saved[1], tmp_path, edit_header=lambda h: {**h, "format_version": 99})
    with pytest.raises(CheckpointError, match="format 99"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def _as_format_2(directory, dst):
    """A copy of a checkpoint in format 2: code rows one after another, (N, words) int32."""
    with safe_open(str(directory / CHECKPOINT_NAME), framework="pt") as f:
        header = json.loads(f.metadata()["lift_ao"])
    tensors = _tensors(directory)
    for key, info in header["quantized"].items():
        tensors[f"{key}.packed_codes"] = row_words(tensors[f"{key}.packed_codes"], info["shape"][0]).contiguous()
    header = {**header, "format_version": 2, "sha256": {k: _sha256(t) for k, t in tensors.items()}}
    dst.mkdir(exist_ok=True)
    save_file(tensors, str(dst / CHECKPOINT_NAME), metadata={"lift_ao": json.dumps(header)})
    return dst


def _two_linears(seed: int) -> torch.nn.Module:
    """Row counts that are not multiples of 32 (37 and 70): the last group of each is partial."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(53, 37), torch.nn.Linear(37, 70)).eval()


def test_format_2_checkpoint_loads_by_exact_regrouping(saved, tmp_path):
    model = _two_linears(0)
    for layer in model:
        layer.weight = torch.nn.Parameter(lift_ao.LiftQuantTensor.from_hp(layer.weight.detach(),
                                                                          lift_ao.Lattice.load("24/10")),
                                          requires_grad=False)
    save_quantized(model, tmp_path / "new")
    for directory, fresh, original in ((tmp_path / "new", _two_linears(1), model),
                                       (saved[1], tiny_llama(seed=1, tie=True), saved[0])):
        old = _as_format_2(directory, tmp_path / "old")
        assert all(t.dim() == 2 for k, t in _tensors(old).items() if k.endswith("packed_codes"))
        loaded = load_quantized(old, fresh)
        assert_bit_identical(original, loaded)


def test_different_lattice_is_refused(saved, tmp_path):
    def claim_other_lattice(header):
        key = next(iter(header["quantized"]))
        header["quantized"][key]["lattice_fingerprint"] = lift_ao.Lattice.load("32/16").fingerprint
        return header

    _rewrite(saved[1], tmp_path, edit_header=claim_other_lattice)
    with pytest.raises(CheckpointError, match="made with lattice"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_stored_lattice_differing_from_its_record_is_refused(saved, tmp_path):
    # Codes re-saved with another lattice's M (checksums recomputed, so only the fingerprint can tell).
    def swap_mapping(tensors):
        key = next(k for k in tensors if k.endswith(".mapping"))
        tensors[key] = tensors[key] + 0.01
        return tensors

    def rehash(header):
        return {**header, "sha256": {k: _sha256(t) for k, t in swap_mapping(_tensors(saved[1])).items()}}

    _rewrite(saved[1], tmp_path, edit_tensors=swap_mapping, edit_header=rehash)
    name = lift_ao.Lattice.for_bits(2.4).name  # the fixture's lattice
    with pytest.raises(CheckpointError, match=f"made with lattice {name} .* but stores {name} .*re-quantize"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_stored_transform_differing_from_its_record_is_refused(saved, tmp_path):
    # A rotation factor re-saved with valid checksums: only the transform fingerprint can tell.
    def perturb_rotation(tensors):
        key = next(k for k in tensors if k.endswith(".rotation_left"))
        tensors[key] = tensors[key].flip(0)
        return tensors

    def rehash(header):
        return {**header, "sha256": {k: _sha256(t) for k, t in perturb_rotation(_tensors(saved[1])).items()}}

    _rewrite(saved[1], tmp_path, edit_tensors=perturb_rotation, edit_header=rehash)
    with pytest.raises(CheckpointError, match="input transform does not match its recorded fingerprint"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_header_records_versions_and_lattices(saved):
    with safe_open(str(saved[1] / CHECKPOINT_NAME), framework="pt") as f:
        header = json.loads(f.metadata()["lift_ao"])
    assert header["format_version"] == FORMAT_VERSION and header["library_version"] == lift_ao.__version__
    record = header["quantized"]["model.layers.0.self_attn.q_proj.weight"]
    lattice = lift_ao.Lattice.for_bits(2.4)  # the fixture's lattice
    assert record["lattice"] == lattice.name and record["lattice_fingerprint"] == lattice.fingerprint
    q_proj = saved[0].model.layers[0].self_attn.q_proj.weight
    assert record["transform_fingerprint"] == q_proj.transform_fingerprint


def test_crash_while_saving_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    model, directory = saved
    save_quantized(model, tmp_path)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()

    def crash_halfway(tensors, path, metadata):
        save_file(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(len(before) // 2)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(lift_ao.io, "save_file", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    load_quantized(tmp_path, tiny_llama(seed=1, tie=True))


def test_mismatched_model_is_refused(saved):
    _, directory = saved
    other = tiny_llama(tie=True)
    other.model.layers = other.model.layers[:1]
    with pytest.raises(CheckpointError, match="has no|does not match"):
        load_quantized(directory, other)


def _state_of(model) -> dict:
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _unchanged(model, before: dict) -> bool:
    after = _state_of(model)
    return after.keys() == before.keys() and all(
        after[k][0] is t and after[k][1].dtype == v.dtype and torch.equal(after[k][1], v) for k, (t, v) in before.items())


def test_a_model_whose_unquantized_shapes_or_dtypes_differ_is_refused_and_left_as_it_was(saved, tmp_path):
    """Checked before anything changes: once the quantized layers were swapped in first, and load_state_dict
    then raised a RuntimeError on the embedding's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, directory = saved
    config = tiny_llama(tie=True).config.to_dict() | {"vocab_size": 128}
    other = LlamaForCausalLM(LlamaConfig(**config))
    before = _state_of(other)
    with pytest.raises(CheckpointError, match="shapes or dtypes differ for .*model.embed_tokens.weight"):
        load_quantized(directory, other)
    assert _unchanged(other, before)

    def relabel(tensors):  # a float32 norm's bytes relabelled int32: same bytes, same digest
        tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int32)
        return tensors

    _rewrite(directory, tmp_path, edit_tensors=relabel)
    model = tiny_llama(tie=True)
    before = _state_of(model)
    with pytest.raises(CheckpointError, match="model.norm.weight.*int32"):
        load_quantized(tmp_path, model)
    assert _unchanged(model, before)


def test_a_meta_model_whose_computed_buffers_are_not_real_is_refused(saved):
    """Rotary frequencies are computed, not saved: on the meta device the loaded model could not run."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    model, directory = saved
    with torch.device("meta"):
        meta = LlamaForCausalLM(model.config)
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq.*init_empty_weights"):
        load_quantized(directory, meta)
    with init_empty_weights(include_buffers=False):
        empty = LlamaForCausalLM(model.config)
    assert_bit_identical(model, load_quantized(directory, empty))


@pytest.mark.parametrize("header", [[1, 2], {"quantized": "x"}, "drop quantized", "dtype int32", "shape string"])
def test_a_malformed_header_is_refused(saved, tmp_path, header):
    """The header's JSON is no tensor's bytes, so no SHA-256 covers it: its fields are checked."""
    def edit(h):
        key = next(iter(h["quantized"]))
        if header == "drop quantized":
            return {k: v for k, v in h.items() if k != "quantized"}
        if header == "dtype int32":
            return {**h, "quantized": {**h["quantized"], key: {**h["quantized"][key], "dtype": "int32"}}}
        if header == "shape string":
            return {**h, "quantized": {**h["quantized"], key: {**h["quantized"][key], "shape": "64x64"}}}
        return header if isinstance(header, list) else {**h, **header}

    _rewrite(saved[1], tmp_path, edit_header=edit)
    with pytest.raises(CheckpointError, match="the lift_ao header is corrupt"):
        load_quantized(tmp_path, tiny_llama(tie=True))


def test_rotation_factors_reshaped_in_the_file_are_refused_as_a_corrupt_checkpoint(saved, tmp_path):
    """Reshaped, a factor keeps its bytes and so its SHA-256: the weight's constructor refuses it (not square),
    as a CheckpointError naming the file and the weight (was: a bare ValueError naming neither)."""
    def edit(tensors):
        key = next(k for k in tensors if k.endswith(".rotation_left"))
        return {**tensors, key: tensors[key].reshape(1, -1)}

    _rewrite(saved[1], tmp_path, edit_tensors=edit)
    with pytest.raises(CheckpointError, match=r"lift_ao\.safetensors: model\.layers\.\d+\.\S+\.weight: rotation_left "
                                              r"must be a square"):
        load_quantized(tmp_path, tiny_llama(tie=True))


@pytest.mark.parametrize("stray", ["[1, 2]", "{not json"])
def test_a_stray_config_json_beside_a_checkpoint_is_ignored_for_a_model_given_to_load_into(tmp_path, stray):
    """Only a transformers model reads the directory's config.json (for its save_pretrained), after the load:
    an odd one made a load into another model raise once the model had changed."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 8, bias=False))
    lift_ao.quantize(model, lift_ao.liftquant(lattice="24/10"), filter_fn=lambda m, name: True, progress=False)
    save_quantized(model, tmp_path)
    (tmp_path / "config.json").write_text(stray)
    loaded = load_quantized(tmp_path, torch.nn.Sequential(torch.nn.Linear(20, 8, bias=False)))
    assert_bit_identical(model, loaded)


def test_settings_hash_leaves_out_run_keys_of_sub_configs_too():
    """A multimodal config's text_config carries use_cache and dtype as the top level does: toggling them there
    changed the hash (a resume was refused); a value the forward uses (its norm eps) does change it."""
    import copy

    from transformers import Gemma3Config

    from lift_ao.io import settings_sha256

    class Holder(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    config = Gemma3Config(text_config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=300,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    steered, other = copy.deepcopy(config), copy.deepcopy(config)
    steered.text_config.use_cache, steered.text_config.dtype = not config.text_config.use_cache, "float16"
    other.text_config.rms_norm_eps = 10 * config.text_config.rms_norm_eps
    assert settings_sha256(Holder(steered)) == settings_sha256(Holder(config)) != settings_sha256(Holder(other))


def test_distinct_empty_tensors_are_not_taken_for_tied_ones(tmp_path):
    """Every empty tensor has storage address 0."""
    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(0))
            self.b = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    save_quantized(Empty(), tmp_path)
    loaded = load_quantized(tmp_path, Empty())
    assert loaded.a is not loaded.b and loaded.a.requires_grad and not loaded.b.requires_grad


def test_non_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_quantized(tmp_path, tiny_llama())
    save_file({"x": torch.zeros(2)}, str(tmp_path / CHECKPOINT_NAME))
    with pytest.raises(CheckpointError, match="not written by lift_ao"):
        load_quantized(tmp_path, tiny_llama())


def test_a_quantized_weight_tied_by_hand_loads_tied(tmp_path):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))

    tied = lift_ao.quantize(model(), liftquant(bits=2.4), filter_fn=lambda m, name: name == "0", progress=False)
    tied[1].weight = tied[0].weight
    save_quantized(tied, tmp_path)
    loaded = load_quantized(tmp_path, model())
    assert loaded[1].weight is loaded[0].weight and isinstance(loaded[0].weight, lift_ao.LiftQuantTensor)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), tied(x))
    shorter = torch.nn.Sequential(model()[0])  # the alias' module is missing (was: a raw AttributeError)
    before = _state_of(shorter)
    with pytest.raises(CheckpointError, match="the model has no '1.weight'"):
        load_quantized(tmp_path, shorter)
    assert _unchanged(shorter, before)
