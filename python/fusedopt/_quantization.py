"""8-bit optimizer state (``state_dtype=torch.uint8``): bitsandbytes' blockwise scheme, see
csrc/fusedopt/quantized.h. A moment is stored as uint8 codes of the param's shape plus
``<key>_absmax``, one fp32 absmax per block of 256 elements in flat order; code ``c`` stands
for ``map[c] * absmax``. ``exp_avg`` and ``momentum_buffer`` use the signed dynamic map,
``exp_avg_sq`` and ``max_exp_avg_sq`` the unsigned one. Params with fewer than 4096
elements keep fp32 moments.

This module builds the maps (the same 256 float32 values as
``bitsandbytes.functional.create_dynamic_map``, by the same formula), quantizes and
dequantizes whole tensors with torch ops (for loading fp32 state into an 8-bit optimizer and
for :func:`dequantize_state_dict`), and converts bitsandbytes' 8-bit state dicts.
"""
from __future__ import annotations

import copy
import functools
import math

import torch

BLOCK = 256
MIN_NUMEL = 4096
SIGNED_KEYS = ("exp_avg", "momentum_buffer")
UNSIGNED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
ABSMAX_SUFFIX = "_absmax"


def dynamic_map(signed: bool) -> torch.Tensor:
    """A fresh copy of :func:`_dynamic_map` (built once per sign: state creation asks for the
    zero code of every 8-bit moment)."""
    return _dynamic_map(signed).clone()


@functools.lru_cache(maxsize=2)
def _dynamic_map(signed: bool) -> torch.Tensor:
    """bitsandbytes' dynamic quantization map (7 exponent bits, 8 bits in all): for each
    decade 10^-6 .. 10^0 the midpoints of an even split of [0.1, 1] (2^i of them, 2^(i+1)
    unsigned), negated too when signed, plus 0 and 1; 256 float32 values, sorted."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-6 + i)
        data += (scale * means).tolist()  # float32 products, as bitsandbytes forms them
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_MAPS: dict = {}
_BUCKET_MIN_EXPONENT, _BINADES = 103, 25  # quantized.h: buckets of [2^-24, 2^1), 256 per binade


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 float32 midpoints (map[c] + map[c+1]) / 2 (formed in float64): the nearest code
    of x is the number of midpoints below x."""
    m = qmap.double()
    return ((m[:-1] + m[1:]) / 2).float()


def bucket_tables(qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantized.h's (base code, threshold) per bucket, positive buckets then negative ones: x's
    nearest code is base + (x > threshold)."""
    mids = midpoints(qmap)
    b = torch.arange(_BINADES * 256, dtype=torch.int64)
    low_bits = ((b // 256 + _BUCKET_MIN_EXPONENT) << 23) | ((b % 256) << 15)
    high_bits = low_bits | 0x7FFF
    low_bits[0] = 0                    # values below 2^-24 share the first bucket ...
    high_bits[-1] = 0x7F7FFFFF         # ... and the last one takes everything above 2
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
    lo_pos, hi_pos = as_float(low_bits), as_float(high_bits)
    lowest = torch.cat([lo_pos, -hi_pos])   # the smallest and largest value of each bucket
    highest = torch.cat([hi_pos, -lo_pos])
    base = torch.searchsorted(mids, lowest)  # number of midpoints < value (right=False)
    top = torch.searchsorted(mids, highest)
    if int((top - base).max()) > 1:
        raise AssertionError("a quantization bucket holds two code boundaries")
    threshold = torch.where(top > base, mids[base.clamp(max=mids.numel() - 1)], torch.tensor(float("inf")))
    return base.to(torch.int32), threshold


def packed_table(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """quantized.h's packed entries of the positive buckets (nearest_code_packed), as int32:
    ``base << 16 | (0xFFFF - threshold's low 15 bits)``, ``0x7FFF`` where the bucket holds no
    threshold. Checks what that function relies on: each threshold lies in its own bucket
    (same exponent and top 8 mantissa bits), the first bucket (which also takes every value
    below 2^-24) and the last (every value from 2) hold none, and the signed map's negative
    midpoints mirror its positive ones but the last (127 of them), the unsigned map's are all
    positive."""
    mids = midpoints(qmap)
    base, threshold = bucket_tables(qmap)
    n = _BINADES * 256
    base, threshold = base[:n].to(torch.int64), threshold[:n]
    has = torch.isfinite(threshold)
    bits = threshold.view(torch.int32).to(torch.int64)
    bucket = (bits >> 15) - (_BUCKET_MIN_EXPONENT << 8)
    if not bool((bucket[has] == torch.arange(n)[has]).all()) or bool(has[0]) or bool(has[-1]):
        raise AssertionError("a quantization threshold lies outside its packed bucket")
    negative = int((mids < 0).sum())
    if signed:
        if negative != 127 or not torch.equal(mids[:127].flip(0), -mids[127:254]):
            raise AssertionError("the signed map is not symmetric as nearest_code_packed assumes")
    elif negative != 0 or float(mids[0]) == 0.0:
        raise AssertionError("the unsigned map has a midpoint at or below 0")
    low = torch.where(has, 0xFFFF - (bits & 0x7FFF), torch.full_like(bits, 0x7FFF))
    return ((base << 16) | low).to(torch.int32)


def maps(device: torch.device) -> torch.Tensor:
    """The kernels' qmaps buffer on `device`: the signed then the unsigned map (512 float32
    values), then per map its bucket tables (int32 base codes, float32 thresholds;
    quantized.h), then per map its packed bucket table (int32), as one float32 tensor."""
    key = str(device)
    t = _MAPS.get(key)
    if t is None:
        qmaps = [dynamic_map(True), dynamic_map(False)]
        parts = list(qmaps)
        for qmap in qmaps:
            base, threshold = bucket_tables(qmap)
            parts += [base.view(torch.float32), threshold]
        for qmap, signed in zip(qmaps, (True, False)):
            parts.append(packed_table(qmap, signed).view(torch.float32))
        t = _MAPS[key] = torch.cat(parts).to(device)
    return t


def is_signed(key: str) -> bool:
    if key in SIGNED_KEYS:
        return True
    if key in UNSIGNED_KEYS:
        return False
    raise ValueError(f"state {key!r} cannot be kept in 8 bits")


def zero_code(key: str) -> int:
    """The code of 0.0 in the key's map (a fresh moment is all zeros)."""
    return int((dynamic_map(is_signed(key)) == 0).nonzero()[0])


def num_blocks(numel: int) -> int:
    return math.ceil(numel / BLOCK)


def quantize(x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes of x's shape, absmax per block): nearest codes of x * (1 / absmax), the number of
    the map's midpoints below it, as the kernels choose them."""
    mids = midpoints(dynamic_map(is_signed(key))).to(x.device)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = torch.zeros(num_blocks(n) * BLOCK, dtype=torch.float32, device=x.device)
    blocks[:n] = flat
    blocks = blocks.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax.clamp_min(1e-38), torch.zeros_like(absmax))
    norm = blocks * inv[:, None]  # value * (1 / absmax), as the kernels form it
    codes = torch.searchsorted(mids, norm.reshape(-1)).to(torch.uint8)[:n].reshape(x.shape)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, key: str) -> torch.Tensor:
    """fp32 values of 8-bit codes (the param's shape) with their per-block absmax."""
    qmap = dynamic_map(is_signed(key)).to(codes.device)
    flat = qmap[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(BLOCK)[: flat.numel()]
    return (flat * scale).reshape(codes.shape)


def dequantize_state_dict(state_dict: dict) -> dict:
    """A plain ``torch.optim`` state dict from one with 8-bit moments: each ``<key>`` with a
    ``<key>_absmax`` becomes fp32 values of the same shape, the ``_absmax`` keys and the
    groups' ``state_dtype`` are dropped. The argument is left unchanged."""
    out = {"state": {}, "param_groups": []}
    for pid, st in state_dict["state"].items():
        if not isinstance(st, dict):
            out["state"][pid] = copy.deepcopy(st)
            continue
        new = {}
        for k, v in st.items():
            if k.endswith(ABSMAX_SUFFIX) and k[: -len(ABSMAX_SUFFIX)] in st:
                continue
            absmax = st.get(k + ABSMAX_SUFFIX)
            if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and isinstance(absmax, torch.Tensor):
                new[k] = dequantize(v, absmax, k)
            else:
                new[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
        out["state"][pid] = new
    for g in state_dict["param_groups"]:
        g = copy.deepcopy(g)
        g.pop("state_dtype", None)
        out["param_groups"].append(g)
    return out


_BNB_KEYS = {"state1": "exp_avg", "absmax1": "exp_avg_absmax", "state2": "exp_avg_sq", "absmax2": "exp_avg_sq_absmax"}
_BNB_QUANT_STATE = "__bnb_optimizer_quant_state__"


def from_bitsandbytes(state_dict: dict, params: list) -> dict:
    """A bitsandbytes 8-bit (blockwise) state dict in fusedopt's layout: state1/absmax1 ->
    exp_avg/exp_avg_absmax, state2/absmax2 -> exp_avg_sq/exp_avg_sq_absmax (codes reshaped to
    the param), an int step -> a float32 tensor; qmaps (bitsandbytes' dynamic maps, the same
    as fusedopt's) are dropped. Codes and absmax are kept as they are. Returns a new dict, or
    the argument itself when it holds no bitsandbytes state."""
    if not any(isinstance(s, dict) and (_BNB_QUANT_STATE in s or "state1" in s) for s in state_dict["state"].values()):
        return state_dict
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    shapes = {pid: p.shape for pid, p in zip(ids, params)}
    out = {"state": {}, "param_groups": copy.deepcopy(state_dict["param_groups"])}
    for pid, st in state_dict["state"].items():
        flat = dict(st)
        flat.update(flat.pop(_BNB_QUANT_STATE, {}))
        new = {}
        for k, v in flat.items():
            if k in ("qmap1", "qmap2"):
                continue
            name = _BNB_KEYS.get(k, k)
            if name in ("exp_avg", "exp_avg_sq") and isinstance(v, torch.Tensor) and pid in shapes:
                v = v.reshape(shapes[pid])
            if name == "step" and not isinstance(v, torch.Tensor):
                v = torch.tensor(float(v), dtype=torch.float32)
            new[name] = v
        out["state"][pid] = new
    for g in out["param_groups"]:
        for k in ("alpha", "t_alpha", "t_beta3"):  # AdEMAMix-only keys of bitsandbytes' groups
            g.pop(k, None)
    return out
