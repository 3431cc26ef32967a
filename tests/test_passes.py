"""lift_ao.passes: install/uninstall and chaining, the rewrites on small FX graphs, and compiled tiny
Llama/Qwen2 models (counters, generated code, numerics, static-cache decode without recompiles).

Compiles are the expensive part (the whole file has a few): graph-level behaviour is tested on
``make_fx`` graphs run directly, Inductor only where the generated code or recompiles matter.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck
from torchao.quantization import quantize_
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import lift_ao
from lift_ao import Lattice, LiftQuantTensor, passes
from lift_ao.passes import LiftAOPassManager, run_passes
from lift_ao.passes.rewrites import fuse_lifts
from tiny_models import tiny_qwen2, token_batch

ops = torch.ops.lift_ao
SLOT = passes.SLOT


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _clean_state():
    counters.clear()
    torch._dynamo.reset()
    yield
    assert passes.is_installed(), "a test left lift_ao's passes uninstalled"


class _UserPass(CustomGraphPass):
    """A user's post-grad pass: records the graphs it saw."""

    def __init__(self, name="user"):
        self.name, self.seen = name, []

    def __call__(self, graph):
        self.seen.append(graph)

    def uuid(self):
        return f"user-pass-{self.name}"


@pytest.fixture
def user_slot():
    """Lets a test put its own value in the slot; restores lift_ao's installation afterwards."""
    passes.uninstall()
    original = getattr(inductor_config, SLOT)
    yield
    passes.uninstall()
    setattr(inductor_config, SLOT, original)
    passes.install()


# ----- install / uninstall / cache key ------------------------------------------------------------


def test_import_installs_one_manager_and_install_is_idempotent():
    manager = getattr(inductor_config, SLOT)
    assert isinstance(manager, LiftAOPassManager)
    assert passes.install() is manager and getattr(inductor_config, SLOT) is manager


def test_single_user_pass_is_chained_first_and_restored(user_slot):
    user = _UserPass()
    setattr(inductor_config, SLOT, user)
    manager = passes.install()
    assert getattr(inductor_config, SLOT) is manager and manager.chained == (user,)
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    manager(graph)
    assert user.seen == [graph]
    assert passes.uninstall() is True
    assert getattr(inductor_config, SLOT) is user
    assert passes.uninstall() is False and getattr(inductor_config, SLOT) is user


@pytest.mark.skipif(not hasattr(torch._inductor.custom_graph_pass, "get_custom_graph_passes"),
                    reason="slot lists need torch >= 2.13")
def test_pass_list_gets_manager_appended_and_restored(user_slot):
    users = [_UserPass("a"), _UserPass("b")]
    setattr(inductor_config, SLOT, users)
    passes.install()
    value = getattr(inductor_config, SLOT)
    assert value[:2] == users and isinstance(value[2], LiftAOPassManager) and len(value) == 3
    value.append(late := _UserPass("late"))  # added in place after install: stays
    passes.uninstall()
    assert getattr(inductor_config, SLOT) == [*users, late]


@pytest.mark.skipif(not hasattr(torch._inductor.custom_graph_pass, "get_custom_graph_passes"),
                    reason="slot lists need torch >= 2.13")
def test_uninstall_keeps_the_chained_pass_when_the_user_composed_a_list_around_us(user_slot):
    first, later = _UserPass("first"), _UserPass("later")
    setattr(inductor_config, SLOT, first)
    passes.install()
    setattr(inductor_config, SLOT, [getattr(inductor_config, SLOT), later])
    assert passes.uninstall() is True and getattr(inductor_config, SLOT) == [first, later]


def test_uuid_is_stable_and_keys_chained_passes():
    assert LiftAOPassManager().uuid() == LiftAOPassManager().uuid() is not None
    with_user = LiftAOPassManager((_UserPass("a"),)).uuid()
    assert with_user not in (None, LiftAOPassManager().uuid(), LiftAOPassManager((_UserPass("b"),)).uuid())
    # A plain function cannot name itself: Inductor must bypass its cache, as it would for it alone.
    assert LiftAOPassManager((lambda graph: None,)).uuid() is None
    # Under freezing the rewrites read frozen weights' values, which the cache key does not hold.
    with inductor_config.patch(freezing=True):
        assert LiftAOPassManager().uuid() is None


# ----- rewrites on make_fx graphs -----------------------------------------------------------------

K, HEAD_ROWS = 64, (48, 16, 16)


@pytest.fixture(scope="module")
def siblings():
    """Three LiftQuantTensors (q/k/v-like) of one input size: shared rotation tensors."""
    lattice = Lattice.load("24/10")
    return [LiftQuantTensor.from_hp(torch.randn(n, K, generator=_gen(i)), lattice) for i, n in enumerate(HEAD_ROWS)]


def _flat(w):
    """w's inner tensors as fresh views: separate graph inputs sharing storage, as after AOTAutograd."""
    tensors = [w.input_signs, w.rotation_left, w.rotation_right, w.mapping, w.packed_codes, w.row_scale]
    return [t.view(t.shape) for t in tensors]


def _norm_then_linears(x, norm_weight, *flat):
    """RMSNorm then one lift → matmul chain per 6 flattened weight tensors (as after AOTAutograd)."""
    normed = norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    outs = []
    for i in range(0, len(flat), 6):
        signs, left, right, mapping, codes, scale = flat[i : i + 6]
        lifted = ops.lift_activation(normed, signs, left, right, mapping)
        outs.append(ops.lifted_matmul(lifted, codes, scale, None))
    return outs


def _calls(gm, name):
    return [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.name() == f"lift_ao::{name}"]


def _count_targets(gm):
    return {name: len(_calls(gm, name)) for name in ("lift_activation", "lifted_matmul", "lifted_linear", "lifted_linear_group")}


def test_siblings_become_one_group_op_with_signs_folded_into_the_norm(siblings):
    x, norm_weight = torch.randn(2, 3, K, generator=_gen(5)), torch.rand(K, generator=_gen(6)) + 0.5
    args = [x, norm_weight, *[t for w in siblings for t in _flat(w)]]
    gm = make_fx(_norm_then_linears, tracing_mode="fake")(*args)
    expected = _norm_then_linears(*args)
    done = run_passes(gm.graph)
    gm.recompile()
    # Different placeholders are never assumed equal (no CSE); the group op shares their lift at run
    # time because they are the same tensors.
    assert done == {"shared_transform": 2, "lift_fusion": 3, "scale_folding": 1}
    assert dict(counters["lift_ao"]) == done
    # Mirrored where Inductor replays counters on FX-graph-cache hits.
    assert {name: counters["inductor"][f"lift_ao_{name}"] for name in done} == done
    assert _count_targets(gm) == {"lift_activation": 0, "lifted_matmul": 0, "lifted_linear": 0, "lifted_linear_group": 1}
    (group,) = _calls(gm, "lifted_linear_group")
    assert group.args[1] is group.args[2][0]  # folded_signs = the first sibling's signs
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_group_op_stays_correct_when_a_sibling_transform_is_swapped_after_compiling(siblings):
    x, norm_weight = torch.randn(3, K, generator=_gen(7)), torch.rand(K, generator=_gen(8)) + 0.5
    args = [x, norm_weight, *[t for w in siblings for t in _flat(w)]]
    gm = make_fx(_norm_then_linears, tracing_mode="fake")(*args)
    run_passes(gm.graph)
    gm.recompile()
    # A swapped weight (another signs tensor for k) reuses the compiled graph: it must still be right.
    args[2 + 6] = -siblings[1].input_signs
    for got, want in zip(gm(*args), _norm_then_linears(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_siblings_with_different_lattices_share_one_group_op_and_fold(siblings):
    # Mixed bit-widths (e.g. from a memory budget): k at 2.0 bits has d = 8, so another padded size.
    k_2bit = LiftQuantTensor.from_hp(torch.randn(16, K, generator=_gen(14)), Lattice.load("16/8"))
    x, norm_weight = torch.randn(3, K, generator=_gen(15)), torch.rand(K, generator=_gen(16)) + 0.5
    args = [x, norm_weight, *_flat(siblings[0]), *_flat(k_2bit), *_flat(siblings[2])]
    gm = make_fx(_norm_then_linears, tracing_mode="fake")(*args)
    assert run_passes(gm.graph) == {"shared_transform": 1, "lift_fusion": 3, "scale_folding": 1}
    gm.recompile()
    for got, want in zip(gm(*args), _norm_then_linears(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lifts_with_the_same_input_nodes_are_computed_once(siblings):
    w = siblings[0]

    def two_heads(x, signs, left, right, mapping, codes, scale):
        a = ops.lifted_matmul(ops.lift_activation(x, signs, left, right, mapping), codes, scale, None)
        lifted = ops.lift_activation(x, signs, left, right, mapping)
        return a, ops.lifted_matmul(lifted, codes, scale, None), lifted.sum()

    args = [torch.randn(2, K, generator=_gen(9)), *_flat(w)]
    gm = make_fx(two_heads, tracing_mode="fake")(*args)
    done = run_passes(gm.graph)
    gm.recompile()
    # The shared lift has a non-matmul reader (the sum), so it is shared but not fused.
    assert done == {"shared_transform": 1, "lift_fusion": 0, "scale_folding": 0}
    assert _count_targets(gm)["lift_activation"] == 1
    for got, want in zip(gm(*args), two_heads(*args)):
        torch.testing.assert_close(got, want)


def test_no_fold_when_the_fused_op_also_reads_the_norm_output_as_its_bias():
    """One reader, two slots: folding the signs into the norm would also flip the bias."""
    w = LiftQuantTensor.from_hp(torch.randn(K, K, generator=_gen(17)), Lattice.load("24/10"))  # N == K

    def bias_from_norm(x, norm_weight, *flat):
        normed = norm_weight * x
        return ops.lifted_matmul(ops.lift_activation(normed, *flat[:4]), *flat[4:], normed)

    args = [torch.randn(K, generator=_gen(18)), torch.rand(K, generator=_gen(19)) + 0.5, *_flat(w)]
    gm = make_fx(bias_from_norm, tracing_mode="fake")(*args)
    assert run_passes(gm.graph)["scale_folding"] == 0
    gm.recompile()
    torch.testing.assert_close(gm(*args), bias_from_norm(*args))


def test_no_fusion_before_a_later_lifts_transform_exists(siblings):
    """A sibling's transform computed after the first matmul: the fused op would read it too early."""
    q, k = siblings[0], siblings[1]

    def late_transform(x, signs, left, right, mapping, cq, sq, ck, sk):
        a = ops.lifted_matmul(ops.lift_activation(x, signs, left, right, mapping), cq, sq, None)
        b = ops.lifted_matmul(ops.lift_activation(x, signs * 2, left, right, mapping), ck, sk, None)
        return a, b

    args = [torch.randn(3, K, generator=_gen(20)), *_flat(q), *_flat(k)[4:]]
    gm = make_fx(late_transform, tracing_mode="fake")(*args)
    assert run_passes(gm.graph)["lift_fusion"] == 0
    gm.graph.lint()
    gm.recompile()
    for got, want in zip(gm(*args), late_transform(*args)):
        torch.testing.assert_close(got, want)


def test_a_linear_whose_bias_is_another_fused_linears_output_fuses_too():
    """The first chain's fused op is a node the pass made: it is the second chain's bias operand (a
    KeyError in fuse_lifts when that chain was found first, as here and with Inductor's locality reordering
    off; run_passes' sharing step happened to reorder this graph first)."""
    lattice = Lattice.load("24/10")
    main = LiftQuantTensor.from_hp(torch.randn(32, K, generator=_gen(30)), lattice)
    condition = LiftQuantTensor.from_hp(torch.randn(32, 48, generator=_gen(31)), lattice)

    def bias_from_a_linear(x, c, *flat):
        b = ops.lifted_matmul(ops.lift_activation(c, *flat[6:10]), *flat[10:12], None)
        return ops.lifted_matmul(ops.lift_activation(x, *flat[:4]), *flat[4:6], b)

    args = [torch.randn(K, generator=_gen(32)), torch.randn(48, generator=_gen(33)), *_flat(main), *_flat(condition)]
    gm = make_fx(bias_from_a_linear, tracing_mode="fake")(*args)
    assert fuse_lifts(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    assert _count_targets(gm) == {"lift_activation": 0, "lifted_matmul": 0, "lifted_linear": 2, "lifted_linear_group": 0}
    torch.testing.assert_close(gm(*args), bias_from_a_linear(*args))


def test_no_fold_when_the_norm_output_has_another_reader(siblings):
    w = siblings[0]

    def norm_linear_and_residual(x, norm_weight, *flat):
        normed = norm_weight * x
        return ops.lifted_matmul(ops.lift_activation(normed, *flat[:4]), *flat[4:], None), normed + 1

    args = [torch.randn(2, K, generator=_gen(10)), torch.rand(K, generator=_gen(11)), *_flat(w)]
    gm = make_fx(norm_linear_and_residual, tracing_mode="fake")(*args)
    assert run_passes(gm.graph) == {"shared_transform": 0, "lift_fusion": 1, "scale_folding": 0}
    gm.recompile()
    (fused,) = _calls(gm, "lifted_linear")
    assert fused.args[1] is not None
    for got, want in zip(gm(*args), norm_linear_and_residual(*args)):
        torch.testing.assert_close(got, want)


def test_fused_ops_pass_opcheck_and_match_the_unfused_chain(siblings):
    q, k, _ = siblings
    x = torch.randn(2, 3, K, generator=_gen(12))
    bias = torch.randn(q.shape[0], generator=_gen(13))
    want_q = F.linear(x, q, bias)
    linear_args = (x, q.input_signs, q.rotation_left, q.rotation_right, q.mapping, q.packed_codes, q.row_scale, bias)
    torch.library.opcheck(ops.lifted_linear, linear_args)
    torch.testing.assert_close(ops.lifted_linear(*linear_args), want_q, rtol=1e-5, atol=1e-5)
    folded = x * q.input_signs[:K]
    torch.testing.assert_close(ops.lifted_linear(folded, None, *linear_args[2:]), want_q, rtol=1e-5, atol=1e-5)
    group_args = (folded, q.input_signs, *[list(t) for t in zip(_flat(q)[:6], _flat(k)[:6])], [bias, None])
    torch.library.opcheck(ops.lifted_linear_group, group_args)
    got_q, got_k = ops.lifted_linear_group(*group_args)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, F.linear(x, k), rtol=1e-5, atol=1e-5)


# ----- compiled Hugging Face models ---------------------------------------------------------------

LIFT_CALLS = {name: f"torch.ops.lift_ao.{name}.default(" for name in
              ("lift_activation", "lifted_matmul", "lifted_linear", "lifted_linear_group")}


def _quantized(model):
    quantize_(model, lift_ao.liftquant(bits=2.4))  # every linear, lm_head included
    return model


def _one_layer_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _compiled_logits(model, ids):
    with torch.no_grad(), fresh_cache():
        ref = model(ids).logits
        out, codes = run_and_get_code(torch.compile(model, fullgraph=True), ids)
    return ref, out.logits, "\n".join(codes)


def test_compiled_llama_runs_fused_ops_only_and_matches_eager():
    model = _quantized(_one_layer_llama())
    layers = model.config.num_hidden_layers
    ref, out, code = _compiled_logits(model, token_batch(0, batch=1, length=8))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # Per layer: q/k/v and gate/up are one group op each, o and down one lifted_linear each; lm_head one.
    assert dict(counters["lift_ao"]) == {
        "shared_transform": 3 * layers, "lift_fusion": 7 * layers + 1, "scale_folding": 2 * layers + 1,
    }
    FileCheck().check_count(LIFT_CALLS["lifted_linear_group"], 2 * layers, exactly=True).run(code)
    FileCheck().check_count(LIFT_CALLS["lifted_linear"], 2 * layers + 1, exactly=True).run(code)
    FileCheck().check_not(LIFT_CALLS["lift_activation"]).check_not(LIFT_CALLS["lifted_matmul"]).run(code)


def test_calibrated_llama_folds_real_valued_input_scales_and_matches_eager():
    """After lift_ao.calibrate the input "signs" carry the activation-aware scales (not ±1); the
    passes must fold and share them all the same (calibrate leaves lm_head in full precision)."""
    model = _one_layer_llama()
    lift_ao.calibrate(model, lift_ao.liftquant(bits=2.4), token_batch(2, batch=4, length=16), progress=False)
    attention = model.model.layers[0].self_attn
    signs = attention.q_proj.weight.input_signs
    assert (signs.abs() - 1).abs().max() > 1e-3 and attention.k_proj.weight.input_signs is signs
    layers = model.config.num_hidden_layers
    ref, out, code = _compiled_logits(model, token_batch(0, batch=1, length=8))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert dict(counters["lift_ao"]) == {"shared_transform": 3 * layers, "lift_fusion": 7 * layers,
                                         "scale_folding": 2 * layers}
    FileCheck().check_count(LIFT_CALLS["lifted_linear_group"], 2 * layers, exactly=True).run(code)
    FileCheck().check_not(LIFT_CALLS["lift_activation"]).check_not(LIFT_CALLS["lifted_matmul"]).run(code)


def test_frozen_bf16_qwen2_folds_signs_into_norm_constants_within_bf16_tolerance():
    model = _quantized(tiny_qwen2()).to(torch.bfloat16)  # q/k/v carry biases
    layers = model.config.num_hidden_layers
    with inductor_config.patch(freezing=True):
        ref, out, code = _compiled_logits(model, token_batch(1, batch=1, length=8))
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)
    # Under freezing the q/k/v transforms are one constant, so the group's siblings share it by node.
    assert counters["lift_ao"]["scale_folding"] == 2 * layers + 1
    FileCheck().check_count("_lift_ao_folded_", 2 * layers + 1, exactly=False).run(code)
    FileCheck().check_count(LIFT_CALLS["lifted_linear_group"], 2 * layers, exactly=True).run(code)
    FileCheck().check_not(LIFT_CALLS["lift_activation"]).run(code)


def test_uninstalled_passes_leave_the_two_op_chain(user_slot):
    model = _quantized(_one_layer_llama())
    layers = model.config.num_hidden_layers
    user = _UserPass()
    setattr(inductor_config, SLOT, user)
    ref, out, code = _compiled_logits(model, token_batch(2, batch=1, length=4))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not counters["lift_ao"] and user.seen
    FileCheck().check_count(LIFT_CALLS["lift_activation"], 7 * layers + 1, exactly=True).run(code)
    FileCheck().check_count(LIFT_CALLS["lifted_matmul"], 7 * layers + 1, exactly=True).run(code)


def test_static_cache_decode_compiles_once_and_matches_eager():
    model = _quantized(_one_layer_llama())

    def decode_step(ids, cache, position):
        return model(input_ids=ids, cache=cache, cache_position=position, use_cache=True).logits

    backend = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(decode_step, backend=backend, fullgraph=True)
    prompt, steps = token_batch(3, batch=1, length=5), 4

    def greedy(step):
        cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps)
        token = decode_step(prompt, cache, torch.arange(prompt.shape[1]))[:, -1:].argmax(-1)
        logits = []
        for i in range(steps):
            logits.append(step(token, cache, torch.tensor([prompt.shape[1] + i])))
            token = logits[-1][:, -1:].argmax(-1)
        return torch.cat(logits, 1)

    with torch.no_grad(), fresh_cache():
        ref = greedy(decode_step)
        out = greedy(compiled_step)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert backend.frame_count == 1, f"decode recompiled: {backend.frame_count} frames for {steps} tokens"
    assert counters["lift_ao"]["lift_fusion"] == 8


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_folded_norm_weight_is_rounded_once(frozen, dtype):
    """Calibrated signs carry 1/s: weight·(1/s) is computed in float32 (float64 for a float64 weight) and
    rounded once to the weight's dtype (the signs were rounded to bf16 first, then the product: two roundings)."""
    from lift_ao.passes.rewrites import _folded_weight

    g = torch.Generator().manual_seed(12)
    weight = (1 + 0.1 * torch.randn(48, generator=g, dtype=torch.float64)).to(dtype)
    signs = torch.where(torch.rand(50, generator=g) < 0.5, -1.0, 1.0) / torch.exp(0.5 * torch.randn(50, generator=g))
    module, graph = torch.nn.Module(), torch.fx.Graph()
    module.weight, module.signs = weight, signs
    nodes = ([graph.get_attr("weight"), graph.get_attr("signs")] if frozen
             else [graph.placeholder("weight"), graph.placeholder("signs")])
    x = graph.placeholder("x")
    for node, value in zip(nodes, (weight, signs)):
        node.meta["val"] = value
    mul = graph.call_function(torch.ops.aten.mul.Tensor, (nodes[0], x))
    graph.output(_folded_weight(graph, mul, *nodes))
    gm = torch.fx.GraphModule(module, graph)
    folded = gm(torch.ones(48)) if frozen else gm(weight, signs, torch.ones(48))
    wide = torch.promote_types(dtype, torch.float32)
    expected = (weight.to(wide) * signs[:48].to(wide)).to(dtype)
    assert folded.dtype == dtype and torch.equal(folded, expected)
    if dtype == torch.bfloat16:
        assert not torch.equal(weight * signs[:48].bfloat16(), expected)  # the two roundings differ here


def _direct_ops_weight(rows: int, seed: int) -> LiftQuantTensor:
    return LiftQuantTensor.from_hp(torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)),
                                   Lattice.load("24/10"))


def test_no_fold_of_signs_computed_after_the_norm():
    """The folded weight·signs was inserted before the norm's mul although the signs were computed after it:
    a graph using a node before its definition (compile crashed)."""
    ops, w = torch.ops.lift_ao, _direct_ops_weight(32, 0)

    def f(x, norm_w, gain, signs, left, right, mapping, codes, scale):
        h = norm_w * x
        s = signs * gain  # the transform computed in the graph, after the norm
        return ops.lifted_matmul(ops.lift_activation(h, s, left, right, mapping), codes, scale, None)

    args = [torch.randn(3, 64), torch.rand(64) + 0.5, torch.tensor(2.0), w.input_signs, w.rotation_left,
            w.rotation_right, w.mapping, w.packed_codes, w.row_scale]
    gm = make_fx(f, tracing_mode="fake")(*args)
    assert run_passes(gm.graph) == {"shared_transform": 0, "lift_fusion": 1, "scale_folding": 0}
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(*args), f(*args), rtol=0, atol=0)


def test_sibling_lifts_without_signs_fuse_one_by_one():
    """Lifts whose x already carries the signs (input_signs=None) became one group op with a None in its
    list of signs tensors, which its schema refuses (compile crashed)."""
    ops, q, k = torch.ops.lift_ao, _direct_ops_weight(32, 1), _direct_ops_weight(16, 2)

    def f(x):
        signed = x * q.input_signs[:64]
        return tuple(ops.lifted_matmul(ops.lift_activation(signed, None, w.rotation_left, w.rotation_right, w.mapping),
                                       w.packed_codes, w.row_scale, None) for w in (q, k))

    x = torch.randn(3, 64)
    gm = make_fx(f)(x)  # the weights' tensors become constants of the graph
    assert run_passes(gm.graph)["lift_fusion"] == 2
    gm.graph.lint()
    gm.recompile()
    assert sum(node.target == torch.ops.lift_ao.lifted_linear.default for node in gm.graph.nodes) == 2
    for got, want in zip(gm(x), f(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
