"""``LiftQuantTensor``: a linear weight stored as LiftQuant codes.

A weight W (N×K) is stored as
    W ≈ diag(r) · blocks(M q) · Rᵀ  (cropped to K columns)
where R is the input rotation (:mod:`lift_ao.transform`), each row of the rotated weight is cut into
Kp/d blocks of d coordinates, and block j of row n is the lattice point ``M q_nj`` with a ±1 code
``q_nj`` of D bits. ``F.linear(x, W)`` never rebuilds W: it computes the lifted activation
x̃ = lift(Rᵀ x) (length Kp·D/d) and ``y = r ⊙ (Q x̃) + b`` through the ops in ``lift_ao.kernels``.

Tensor data (all plain tensors, so the subclass flattens for ``torch.compile`` and safetensors):
    packed_codes:   (⌈N/32⌉, W/4, 32, 4) int32 = packed_shape(N, L), L = Kp·D/d, W = words_per_row(L)
                    (lift_ao.packing; checkpoint format version 3). Row n's code bits in order
                    (block-major, D bits per block), bit j in the row's word j//32 at bit j%32, LSB
                    first, 1 = +1, zero past L to a whole 16-byte quad of 4 words. Rows are interleaved
                    in groups of 32: group, quad, row in the group, word in the quad, so word w of row n
                    is element [n//32, w//4, n%32, w%4]; rows past N in the last group are zero. The
                    decode kernel (kernels/triton_lut.py) gives each thread one row and loads a quad per
                    step: interleaved, a warp's 32 quads are 512 contiguous bytes. N is
                    ``shape[0]`` (= len(row_scale)), not the codes' first dimension.
    row_scale:      (N,) float32, r.
    mapping:        (d, D) float32, the lattice matrix M.
    input_signs:    (Kp,) float32: the random ±1 signs, divided by activation-aware input scales
                    when calibrated (lift_ao.calibrate); rotation_left (k1, k1), rotation_right (k2, k2)
                    float32: R.
Attributes: ``shape`` (N, K) and ``dtype`` (the logical dtype that ``F.linear`` returns and
``dequantize`` produces; the stored data keeps its own dtypes).
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils.weak import WeakIdKeyDictionary
from torchao.utils import TorchAOBaseTensor, fill_defaults

from lift_ao.encode import encode_weight
from lift_ao.lattice import Lattice
from lift_ao.packing import GROUP_ROWS, interleave_rows, packed_shape, random_packed_codes, row_words, unpack_codes
from lift_ao.transform import check_rotation, check_seed, make_rotation, padded_in_features, unrotate

__all__ = ["LiftQuantTensor", "share_constants"]

aten = torch.ops.aten


# The stored tensors a weight may share with sibling layers, other models and the caches below (the
# rest, codes and row scales, it owns).
SHARED_DATA_NAMES = ("mapping", "input_signs", "rotation_left", "rotation_right")

# One copy of each M and each rotation per device, so linears with the same lattice share M and
# linears reading the same activation (q/k/v, gate/up: same K, d and seed) share the rotation, as
# the footprint counts and the passes expect. Unbounded: an evicted key would give later layers copies of
# their own (a model of many input sizes and lattices over its budget); each entry is a few K floats.
@cache
def _shared_mapping(lattice: Lattice, device: torch.device) -> torch.Tensor:
    return lattice.M.to(device)


@cache
def _shared_rotation(in_features: int, block: int, seed: int, device: torch.device):
    rotation = make_rotation(in_features, block, seed)
    return tuple(t.to(device) for t in (rotation.signs, rotation.left, rotation.right))


def check_weight(weight, name: str = "weight") -> None:
    """Raise unless ``weight`` is a 2-D (out, in) floating-point tensor with values, all finite: what
    :meth:`LiftQuantTensor.from_hp` codes (``lift_ao.quantize`` checks every layer before coding any)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: LiftQuant codes 2-D linear weights (out, in); got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be floating point to quantize, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device (no values); load the real weights before quantizing")
    if weight.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty weight of shape {tuple(weight.shape)}")
    # In slices of ~4M entries: isfinite on the whole weight would briefly cost ~2x its size.
    if not all(torch.isfinite(rows).all() for rows in weight.split(max(1, 2**22 // weight.shape[1]))):
        raise ValueError(f"{name}: weight has NaN/Inf entries; fix the checkpoint before quantizing")


class LiftQuantTensor(TorchAOBaseTensor):
    """LiftQuant-coded linear weight of logical shape (N, K); see the module docstring."""

    tensor_data_names = ["packed_codes", "row_scale", "mapping", "input_signs", "rotation_left", "rotation_right"]
    tensor_attribute_names = ["shape", "dtype"]

    def __new__(cls, packed_codes, row_scale, mapping, input_signs, rotation_left, rotation_right, shape, dtype):
        # Every weight is built here (from_codes, load_quantized, the HF loader, calibration, slices, moves), but
        # checked in eager mode only: rebuilt by torch.compile(dynamic=True) from symbolic sizes, the comparison
        # would tie the signs' size to the factors' product, a compound symbol Dynamo cannot bind to its input.
        if not is_fake(rotation_left):
            check_rotation(input_signs, rotation_left, rotation_right)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=packed_codes.device, requires_grad=False
        )

    def __init__(self, packed_codes, row_scale, mapping, input_signs, rotation_left, rotation_right, shape, dtype):
        self.packed_codes = packed_codes
        self.row_scale = row_scale
        self.mapping = mapping
        self.input_signs = input_signs
        self.rotation_left = rotation_left
        self.rotation_right = rotation_right

    def __tensor_flatten__(self):
        # Same result as TorchAOBaseTensor's, without its optional-name probing: Dynamo calls this in
        # a guard on every call of a compiled model, once per weight (224 weights in an 8B model),
        # and this version costs a third less per guard check (measured on the CPU).
        return list(self.tensor_data_names), {"shape": self.shape, "dtype": self.dtype}

    # ----- construction ---------------------------------------------------------------------

    @classmethod
    def from_hp(
        cls, weight: torch.Tensor, lattice: Lattice, *, seed: int = 0, progress: bool = False,
        name: str = "weight", beam_width: int | None = None,
    ) -> "LiftQuantTensor":
        """Quantize a high-precision weight.

        Args:
            weight: (N, K) floating-point weight (any device; encoding runs on its device).
            lattice: the lattice to code with.
            seed: seed of the input rotation (linears sharing K, d and seed share it).
            progress: show a progress bar over row chunks.
            name: used in error messages (e.g. the module's name).
            beam_width: the search's beam width (None = the lattice's default,
                :func:`lift_ao.search.default_beam_width`).
        Returns:
            LiftQuantTensor with shape (N, K) and dtype ``weight.dtype``.
        """
        if not isinstance(lattice, Lattice):
            raise TypeError(f"{name}: lattice must be a lift_ao.Lattice (e.g. Lattice.load('24/10')), got {lattice!r}")
        check_seed(seed, f"{name}: seed")
        check_weight(weight, name)
        signs, left, right = _shared_rotation(weight.shape[1], lattice.d, seed, weight.device)
        packed, row_scale = encode_weight(
            weight, lattice.to(weight.device), signs, left, right, progress=progress, beam_width=beam_width
        )
        return cls.from_codes(packed, row_scale, lattice, seed=seed, shape=weight.shape, dtype=weight.dtype)

    @classmethod
    def from_codes(
        cls, packed_codes: torch.Tensor, row_scale: torch.Tensor, lattice: Lattice, *, seed: int,
        shape, dtype: torch.dtype,
    ) -> "LiftQuantTensor":
        """Wrap stored codes (e.g. a resumed layer), sharing M and the rotation like :meth:`from_hp`.

        Args:
            packed_codes: packed_shape(N, L) int32, L = Kp·D/d (lift_ao.packing), on the target device.
            row_scale: (N,) float32, same device.
            lattice, seed: as given to :meth:`from_hp`.
            shape: (N, K); dtype: the logical dtype.
        """
        device = packed_codes.device
        signs, left, right = _shared_rotation(shape[1], lattice.d, seed, device)
        expected = packed_shape(shape[0], signs.shape[0] // lattice.d * lattice.D)
        if tuple(packed_codes.shape) != expected or tuple(row_scale.shape) != (shape[0],):
            raise ValueError(
                f"codes {tuple(packed_codes.shape)} and scales {tuple(row_scale.shape)} do not fit a {tuple(shape)} "
                f"weight with lattice {lattice.name}: expected {expected} and ({shape[0]},)"
            )
        mapping = _shared_mapping(lattice, device)
        return cls(packed_codes, row_scale, mapping, signs, left, right, torch.Size(shape), dtype)

    @classmethod
    def from_random_codes(
        cls, shape, lattice: Lattice, *, dtype: torch.dtype, device, generator: torch.Generator, seed: int = 0,
    ) -> "LiftQuantTensor":
        """A weight with uniformly random codes, for speed and memory measurements (no search).

        Args:
            shape: (N, K); lattice, seed: as for :meth:`from_hp`; dtype: the logical dtype.
            device: where the tensors live; generator: CPU generator for the codes.
        Returns:
            LiftQuantTensor (N, K) whose dequantized entries have std ≈ 0.02 (Hugging Face's init), so
            activations through a model of them stay finite.
        """
        n, k = shape
        code_length = padded_in_features(k, lattice.d)[0] // lattice.d * lattice.D
        packed = random_packed_codes(n, code_length, generator=generator)
        # A decoded coordinate (M q)_i has variance ||M||²/d for random q.
        scale = 0.02 / float((lattice.M.square().sum() / lattice.d).sqrt())
        row_scale = torch.full((n,), scale, dtype=torch.float32, device=device)
        return cls.from_codes(packed.to(device), row_scale, lattice, seed=seed, shape=shape, dtype=dtype)

    # ----- properties -----------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        """d, weights per block."""
        return self.mapping.shape[0]

    @property
    def code_bits(self) -> int:
        """D, code bits per block."""
        return self.mapping.shape[1]

    @property
    def padded_in_features(self) -> int:
        """Kp ≥ K, the rotated input size."""
        return self.input_signs.shape[0]

    @property
    def code_length(self) -> int:
        """L = Kp·D/d code bits per row."""
        return self.padded_in_features // self.block_size * self.code_bits

    @property
    def lattice(self) -> Lattice:
        """The lattice this weight is coded with."""
        return Lattice(self.block_size, self.code_bits, self.mapping.cpu())

    @property
    def transform_fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of the input transform (signs and both rotation factors, float32)."""
        h = hashlib.sha256()
        for t in (self.input_signs, self.rotation_left, self.rotation_right):
            h.update(f"{tuple(t.shape)},".encode())
            h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def storage_bytes(self) -> int:
        """Bytes of all stored tensors (codes with their padding to whole groups of 32 rows, scales,
        lattice and rotation)."""
        return sum(getattr(self, n).nbytes for n in self.tensor_data_names)

    def bits_per_weight(self) -> float:
        """Storage bits per logical weight, everything included."""
        return 8 * self.storage_bytes() / math.prod(self.shape)

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Dense (N, K) weight in ``output_dtype`` (default: ``self.dtype``)."""
        n = self.shape[0]
        codes = unpack_codes(self.packed_codes, self.code_length, n).view(n, self.code_length // self.code_bits,
                                                                          self.code_bits)  # n may be 0
        blocks = (codes.to(torch.float32) * 2 - 1) @ self.mapping.T  # (N, Kp/d, d)
        rotated = blocks.flatten(1) * self.row_scale[:, None]
        dense = unrotate(rotated, self.input_signs, self.rotation_left, self.rotation_right, self.shape[1])
        return dense.to(output_dtype or self.dtype)

    def __repr__(self):
        return f"LiftQuantTensor({self._quantization_type()})"

    def _stable_hash_for_caching(self) -> str:
        # Compile caches key on metadata, not values (the codes are graph inputs).
        parts = [str(tuple(self.shape)), str(self.dtype)] + [
            f"{n}:{tuple(getattr(self, n).shape)}:{getattr(self, n).dtype}:{getattr(self, n).device.type}"
            for n in self.tensor_data_names
        ]
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def _quantization_type(self):
        return (
            f"shape={tuple(self.shape)}, lattice={self.code_bits}/{self.block_size}, "
            f"bits_per_weight={self.bits_per_weight():.4f}, device={self.device}"
        )


implements = LiftQuantTensor.implements
implements_torch_function = LiftQuantTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    # F.linear(input, weight, bias=None): any of them may come by keyword.
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    lifted = torch.ops.lift_ao.lift_activation(
        x, weight.input_signs, weight.rotation_left, weight.rotation_right, weight.mapping
    )
    return torch.ops.lift_ao.lifted_matmul(lifted, weight.packed_codes, weight.row_scale, bias)


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    # load_state_dict's copy. torchao's default writes every stored tensor in place, which would also
    # change every layer and model sharing this one's M or transform (and the caches that hand them
    # out): only what the weight owns is written; the shared constants are rebound to src's.
    # A logical dtype that differs is kept, as a plain tensor's copy_ converts: it only names the output's dtype.
    self, src = args[0], args[1]
    if not isinstance(self, LiftQuantTensor):
        raise ValueError(f"cannot copy a LiftQuant weight into a plain tensor of shape {tuple(self.shape)}: quantize the "
                         "model with the same config before loading this state (or load_state_dict(..., assign=True))")
    shapes = lambda t: [getattr(t, n).shape for n in t.tensor_data_names]  # noqa: E731
    if not isinstance(src, LiftQuantTensor) or (self.shape, shapes(self)) != (src.shape, shapes(src)):
        raise ValueError(f"cannot copy {src!r} into LiftQuantTensor({self._quantization_type()}): the shape and "
                         "lattice must match; quantize the model with the same config before loading this state")
    # Rows of a weight (aten.slice): a copy_ must reach the weight, whose codes decode with its own M and rotation.
    rows = _ROW_SLICES.get(self)
    if rows == "copy":
        raise ValueError("these rows of a LiftQuant weight do not start and end at groups of 32 rows (a regrouped "
                         "copy): a copy_ into them would not reach the weight; copy whole groups of 32 rows, or the weight")
    if rows == "view" and not all(getattr(self, n) is getattr(src, n) or torch.equal(getattr(self, n), getattr(src, n).to(self.device))
                                  for n in SHARED_DATA_NAMES):
        raise ValueError("the source's lattice matrix or rotation differs from the weight these rows belong to, which "
                         "keeps its own: quantize the source with the weight's lattice and seed")
    for name in self.tensor_data_names:
        if name in SHARED_DATA_NAMES:
            setattr(self, name, getattr(src, name).to(self.device))
        else:
            getattr(self, name).copy_(getattr(src, name))
    return self


# Copies of shared M / rotation tensors on other devices, by source storage (the aliases of a tensor that
# each nn.Parameter wrapping makes share it): {storage: {(view, device): copy}}. model.to(device) moves each
# weight alone; without this every layer got its own copy of what its siblings share (footprint counted
# them per layer, the fused ops' same-tensor test failed). Entries go with the source storage; the copies
# are small (M, rotation factors and signs: well under 1 MB for a 70B model).
_MOVED = WeakIdKeyDictionary()


def _moved_shared(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    """``t`` (a shared M or rotation tensor) on ``device``: the copy made for an alias of ``t`` before, as long
    as it still holds ``t``'s values (either may have been changed in place since), else a new one."""
    moved = t.to(device, non_blocking=non_blocking)
    # Not under tracing: fake tensors have no values to compare (and must not outlive the trace here).
    if moved.device == t.device or t.is_meta or is_fake(moved) or torch.compiler.is_compiling():
        return moved
    copies = _MOVED.setdefault(t.untyped_storage(), {})
    key = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, moved.device)
    kept = copies.get(key)
    if kept is not None and (moved.is_meta or torch.equal(kept, moved)):
        return kept
    copies[key] = moved
    return moved


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    # Moves the stored tensors to the new device; a new dtype only changes the logical dtype
    # (codes stay bits, scales and transforms stay float32). A copy, as for any tensor: the codes and
    # row scales are the new tensor's own even on the same device (a copy_ into it must not reach this
    # one); M and the rotation stay shared there, as between layers.
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    tensors = [_moved_shared(getattr(self, n), to["device"], to["non_blocking"]) if n in SHARED_DATA_NAMES
               else getattr(self, n).to(to["device"], non_blocking=to["non_blocking"], copy=True)
               for n in self.tensor_data_names]
    return LiftQuantTensor(*tensors, self.shape, to["dtype"])


# Row slices (aten.slice) by object: "view" (whole groups of 32 rows) or "copy" (regrouped), what a copy_
# into them can reach. Not an attribute: a deepcopy or a pickled copy is a weight of its own. Eager only.
_ROW_SLICES = WeakIdKeyDictionary()


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    # Row slices (tensor-parallel / vLLM-style loaders) keep whole rows of codes; the input
    # dimension is rotated as a whole and cannot be sliced. Rows are interleaved in groups of 32:
    # a slice of whole groups (or one that ends at the last row, whose group's padding rows are
    # zero already) is a view of them; other boundaries regroup the rows (an exact copy).
    self, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    dim = dim % 2
    if dim != 0 or step != 1:
        raise NotImplementedError(
            "LiftQuantTensor supports contiguous slices of output rows only (dim 0, step 1); "
            "the input dimension is rotated as a whole"
        )
    start, end, _ = slice(start, end).indices(self.shape[0])
    end = max(start, end)
    view = start % GROUP_ROWS == 0 and (end % GROUP_ROWS == 0 or end == self.shape[0])
    if view:
        codes, row_scale = self.packed_codes[start // GROUP_ROWS:-(-end // GROUP_ROWS)], self.row_scale[start:end]
    else:  # a copy throughout: no half of it may write into this tensor (copy_ refuses it, below)
        codes, row_scale = interleave_rows(row_words(self.packed_codes, self.shape[0])[start:end]), self.row_scale[start:end].clone()
    rows = LiftQuantTensor(codes, row_scale, self.mapping, self.input_signs, self.rotation_left, self.rotation_right,
                           torch.Size([end - start, self.shape[1]]), self.dtype)
    _ROW_SLICES[rows] = "view" if view and _ROW_SLICES.get(self) != "copy" else "copy"  # rows of a copy are a copy
    return rows


@implements([aten.detach.default, aten.alias.default])
def _(func, types, args, kwargs):
    # An alias of rows (w[1:5].detach(), nn.Parameter(w[:32])) is the same rows: what a copy_ into them
    # can reach is recorded for it too (torchao's default alias knew nothing of row slices).
    alias = return_and_correct_aliasing(func, args, kwargs, args[0]._apply_fn_to_data(func))
    if args[0] in _ROW_SLICES:
        _ROW_SLICES[alias] = _ROW_SLICES[args[0]]
    return alias


# Allow torch.load(weights_only=True) of checkpoints that pickle this class.
torch.serialization.add_safe_globals([LiftQuantTensor])


def share_constants(model: torch.nn.Module) -> None:
    """Make equal lattice matrices and rotations of a model's LiftQuant weights one tensor each.

    A checkpoint stores each layer's M and rotation separately; in memory, layers that read the same
    activation shared one copy (:meth:`LiftQuantTensor.from_hp`), which :func:`lift_ao.footprint`
    counts once and the compile passes need to compute the rotated activation once. Loaders call this
    to restore that sharing.
    """
    shared: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, LiftQuantTensor):
            continue
        for name in SHARED_DATA_NAMES:
            tensor = getattr(weight, name)
            key = (name, tensor.device, tensor.dtype, tuple(tensor.shape), tensor.cpu().numpy().tobytes())
            setattr(weight, name, shared.setdefault(key, tensor))
