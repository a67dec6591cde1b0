"""The opt-in 8-bit ring: keys and values stored as ``float8_e4m3fn`` codes with one float16 scale per token and kv
head, in the layout xFormers' split-K decode kernel reads natively (`Fp8KVLayer`).

One token's head ``x`` (``D`` values) is stored as::

    scale = fp16(clamp(amax|x| / 448, SCALE_MIN, SCALE_MAX))     # 448: the largest e4m3 value
    codes = e4m3(clamp(fp32(x) / fp32(scale), -448, 448))       # round to nearest even
    x'    = model_dtype(fp16(fp16(codes) * scale) + shift)       # shift = 0: xFormers' dequantization, in float16

Each slot keeps ``(scale, shift)`` as two float16 side by side, so ``.view(torch.int32)`` is xFormers'
``k_fp8_scale_shift``/``v_fp8_scale_shift`` (scale in the low half); the codes ``[..., D]`` viewed as int32 are its
packed ``[..., D // 4]`` keys. The shift stays 0: symmetric rows need no offset, and ``q * s + 0`` rounds once
whether or not a kernel fuses it, so `dequantize` here and the kernel give the same bits.

`quantize` and `dequantize` are the only place either formula lives: the layer's writes and reads, and the tests'
and benchmark's fake-quantized reference, all call them.
"""

from __future__ import annotations

import torch

from ._layers import KVLayer, write_tokens
from ._plan import PlanIndices

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
ACCEPTED_KV_DTYPES = (None, FP8)
# The scale is a float16 (xFormers packs two per int32). Below float16's smallest normal number a scale would lose
# precision as a subnormal; an all-zero row gets this scale and codes 0, so it stays exactly zero.
SCALE_MIN = 2.0**-14
# The dequantized value is computed in float16 (xFormers' kernel does so): 448 * scale must stay finite. 65504 / 448
# = 146.21 rounds to 146.25 in float16, whose product with 448 (65520) rounds to inf; the float16 below it does not.
SCALE_MAX = 146.125


def check_kv_dtype(kv_dtype) -> None:
    """Refuse a storage format the cache does not offer, naming the ones it does."""
    if not any(kv_dtype is accepted for accepted in ACCEPTED_KV_DTYPES):
        raise ValueError(
            f"kv_dtype={kv_dtype!r} is not offered: pass kv_dtype=None (keys and values in the model's dtype, the "
            "default) or kv_dtype=torch.float8_e4m3fn (an 8-bit ring: e4m3 codes with one float16 scale per token "
            "and kv head)."
        )


def quantize(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., D]`` in any float dtype -> e4m3 codes ``[..., D]`` and float16 ``(scale, shift=0)`` pairs ``[..., 2]``,
    one pair per row of ``D`` (per token and kv head). Computed in float32, so every device rounds alike; the clamp
    keeps a value that the float16 rounding of its scale pushed past 448 at 448, never NaN."""
    amax = states.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(SCALE_MIN, SCALE_MAX).to(torch.float16)  # [..., 1]
    codes = (states.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, torch.cat([scale, torch.zeros_like(scale)], dim=-1)


def dequantize(codes: torch.Tensor, scale_shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes ``[..., D]`` and their ``(scale, shift)`` ``[..., 2]`` -> values ``[..., D]`` in ``dtype``, computed in
    float16 exactly as xFormers' split-K kernel dequantizes (``fp16(code) * scale + shift``), then cast."""
    scale, shift = scale_shift[..., :1], scale_shift[..., 1:]
    return (codes.to(torch.float16) * scale + shift).to(dtype)


def write_fp8_tokens(
    flat_keys: torch.Tensor,
    flat_values: torch.Tensor,
    flat_key_scales: torch.Tensor,
    flat_value_scales: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    keep: torch.Tensor | None,
) -> None:
    """A decode step's write into an 8-bit ring: quantize row i of ``keys``/``values`` (``[B, H_kv, D]``) and write
    its codes and scales to flat storage row ``slots[i]``, unless ``keep[i]`` is False (then neither changes).

    ``flat_keys``/``flat_values`` are the codes viewed as uint8 (``index_copy_`` has no float8 kernel on CPU),
    ``flat_*_scales`` the float16 pairs ``[B * capacity, H_kv, 2]``. A pure tensor function, like `write_tokens`,
    so CUDA graph decoding can compile it."""
    key_codes, key_scales = quantize(keys)
    value_codes, value_scales = quantize(values)
    write_tokens(flat_keys, flat_values, key_codes.view(torch.uint8), value_codes.view(torch.uint8), slots, keep)
    write_tokens(flat_key_scales, flat_value_scales, key_scales, value_scales, slots, keep)


class Fp8KVLayer(KVLayer):
    """A `KVLayer` (ring or global) that stores ``float8_e4m3fn`` codes (``slot_keys``/``slot_values``
    ``[B, capacity, H_kv, D]``) and float16 ``(scale, shift)`` pairs (``key_scales``/``value_scales``
    ``[B, capacity, H_kv, 2]``): (D + 4) bytes per token and kv head instead of 2 D in bf16.

    The attention reads it dequantized, in the model's dtype (`attended`, `history_with`): the exact path, on every
    device. `attended_fp8` hands a decode kernel the same storage in xFormers' packed int32 layout instead.

    ``keys``/``values`` (Transformers' layout, ``[B, H_kv, capacity, D]``) are the dequantized contents: a copy,
    so writing into them changes nothing; assigning to them quantizes what is assigned.
    """

    key_scales: torch.Tensor | None = None  # [B, capacity, H_kv, 2] float16: (scale, shift=0)
    value_scales: torch.Tensor | None = None
    _STORAGE = ("slot_keys", "slot_values", "key_scales", "value_scales")
    decode_writer = staticmethod(write_fp8_tokens)

    @property
    def keys(self) -> torch.Tensor | None:
        """``[B, H_kv, capacity, D]``: the keys as the attention reads them (dequantized, a copy)."""
        if self.slot_keys is None:
            return None
        return dequantize(self.slot_keys, self.key_scales, self.dtype).transpose(1, 2)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self.slot_keys, self.key_scales = (
            (None, None) if value is None else quantize(value.transpose(1, 2).contiguous())
        )

    @property
    def values(self) -> torch.Tensor | None:
        """``[B, H_kv, capacity, D_v]``: the values as the attention reads them (dequantized, a copy)."""
        if self.slot_values is None:
            return None
        return dequantize(self.slot_values, self.value_scales, self.dtype).transpose(1, 2)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.slot_values, self.value_scales = (
            (None, None) if value is None else quantize(value.transpose(1, 2).contiguous())
        )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        value_dim = value_states.shape[-1]
        if head_dim % 4 or value_dim % 4:
            raise ValueError(
                f"kv_dtype=torch.float8_e4m3fn needs head dimensions divisible by 4 (xFormers packs four e4m3 codes "
                f"into one int32), but this model's keys have {head_dim} and values {value_dim}. Use kv_dtype=None "
                "for this model."
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        slots = (batch, self.capacity, heads)
        self.slot_keys = torch.zeros(*slots, head_dim, dtype=FP8, device=self.device)
        self.slot_values = torch.zeros(*slots, value_dim, dtype=FP8, device=self.device)
        self.key_scales = torch.zeros(*slots, 2, dtype=torch.float16, device=self.device)
        self.value_scales = torch.zeros(*slots, 2, dtype=torch.float16, device=self.device)
        self.is_initialized = True

    # --- storage access, used by the attention function ------------------------------------------------------------
    def _flat_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (as uint8) and scales, flattened to rows ``b * capacity + slot``: views of the storage."""
        return (
            self.slot_keys.view(torch.uint8).flatten(0, 1),
            self.slot_values.view(torch.uint8).flatten(0, 1),
            self.key_scales.flatten(0, 1),
            self.value_scales.flatten(0, 1),
        )

    def write_decode(
        self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        """Quantize one token per sequence (``[B, H_kv, D]``) into ``slots``; a row whose ``keep`` is False changes
        neither its codes nor its scales."""
        self.decode_writer(*self._flat_codes(), keys, values, slots, keep)

    def write(self, keys: torch.Tensor, values: torch.Tensor, indices: PlanIndices) -> None:
        """Quantize packed new tokens ``[T, H_kv, D]`` into their slots, in place: one slot per kept token."""
        flat_keys, flat_values, flat_key_scales, flat_value_scales = self._flat_codes()
        pairs = ((keys, flat_keys, flat_key_scales), (values, flat_values, flat_value_scales))
        for states, codes_out, scales_out in pairs:
            codes, scales = quantize(states.index_select(0, indices.write_source))
            codes_out.index_copy_(0, indices.write_slot, codes.view(torch.uint8))
            scales_out.index_copy_(0, indices.write_slot, scales)

    def _gathered(self, rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of flat storage rows ``rows``, dequantized to ``dtype`` (a later prefill chunk reads its
        held tokens so; its own are quantized only when written, after)."""
        return tuple(
            dequantize(codes.flatten(0, 1).index_select(0, rows), scales.flatten(0, 1).index_select(0, rows), dtype)
            for codes, scales in ((self.slot_keys, self.key_scales), (self.slot_values, self.value_scales))
        )

    def attended(self, key_span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: the first ``key_span`` slots of every row, dequantized to the model's dtype,
        ``[B, key_span, H_kv, D]``."""
        return (
            dequantize(self.slot_keys[:, :key_span], self.key_scales[:, :key_span], self.dtype),
            dequantize(self.slot_values[:, :key_span], self.value_scales[:, :key_span], self.dtype),
        )

    def attended_fp8(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode, for a kernel that dequantizes as it reads (xFormers' split-K): the whole storage in xFormers'
        packed layout, views, no copy: key codes ``[B, capacity, H_kv, D // 4]`` int32, key scale-shifts
        ``[B, capacity, H_kv]`` int32 (two float16 each), then the same for the values."""
        return (
            self.slot_keys.view(torch.int32),
            self.key_scales.view(torch.int32).squeeze(-1),
            self.slot_values.view(torch.int32),
            self.value_scales.view(torch.int32).squeeze(-1),
        )
