"""How tap values become stored bytes and back: storage dtypes, 8-bit codes, and the codec chain of every array.

Cache dtypes (attribute ``featcache_dtype`` on each tap array):
- ``float16``, ``float32``; ``bfloat16`` stored as uint16 bits (zarr has no bfloat16);
- ``int8`` and ``float8_e4m3``: 8-bit codes plus one scale per token row in the sibling array
  ``<tap>_scale`` (shape without the channel axis). A row x of C channels is stored as
  ``codes = round(x / s)`` (int8, clamped to |codes| <= 127) or ``codes = fp8_e4m3(x / s)`` (uint8 bits,
  |x/s| <= 448) with ``s = bfloat16(max|x| / 127)`` (or ``/ 448``), and read back as ``x ~ codes * s``.
  The scale is bfloat16 (float32's exponent range: a row of values down to ~1e-36 keeps its precision),
  stored as uint16 bits with the array attribute ``featcache_scale_dtype: "bfloat16"``; stores written
  before hold float16 scales (no attribute; subnormal below max|x| ~7.8e-3, zero below ~3.8e-6), which are
  still read, and resumed with float16 scales. The stored numpy dtype tells them apart (``decode_scale``).
  Deterministic, so a resumed or repaired shard is bitwise equal. Each shard also records its quantization error in
  ``<tap>_qerr`` (shard, [sum of squared errors, sum of squared values]), which ``inspect --stats`` reports.
``encode`` / ``decode`` / ``quantize`` / ``dequantize`` are the only places that know these layouts; plain
numpy users decode with ``decode_array``. Every chunk ends in a crc32c checksum; only the codecs in
``ALLOWED_CODECS`` are ever decoded.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from featcache.errors import StoreError
from featcache.manifest import COMPRESSORS

# Codecs featcache reads. Each only reshapes, compresses or checksums bytes; anything else (an
# object codec that unpickles, say, registered by some installed package) is refused before a
# chunk is decoded, so opening a store never runs code from it.
ALLOWED_CODECS = frozenset(
    {"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose", "vlen-utf8", "vlen-bytes"}
)
# cache dtype -> the torch dtype its stored representation is held in (8-bit: the codes)
TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int8": torch.int8,
    "float8_e4m3": torch.uint8,
}
EIGHT_BIT = {"int8": (torch.int8, 127.0), "float8_e4m3": (torch.float8_e4m3fn, 448.0)}  # code type, largest code
SCALE_SUFFIX, QERR_SUFFIX = "_scale", "_qerr"
# the type of the per-row scales of 8-bit caches: bfloat16 (float32's exponent range; stored as uint16 bits,
# array attribute featcache_scale_dtype), or float16 in stores written before (no attribute)
SCALE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SCALE_DTYPE = "bfloat16"
SCALE_DTYPE_ATTR = "featcache_scale_dtype"
# recorded on each 8-bit tap array for plain zarr / dask / xarray users (docs/store.md)
_SCALE_HINT = (
    "scale: the <tap>_scale array as float32, (s.astype(uint32) << 16).view(float32) for its bfloat16 bits "
    "(uint16; float16 in older stores: s.astype(float32))"
)
DECODE_HINTS = {
    "int8": f"x = codes.astype(float32) * scale[..., None]  ({_SCALE_HINT})",
    "float8_e4m3": "x = codes.view(float8_e4m3fn).astype(float32) * scale[..., None]  (ml_dtypes, or "
    f"torch.from_numpy(codes).view(torch.float8_e4m3fn).float(); {_SCALE_HINT})",
}


def storage_dtype(dtype: str) -> str:
    """The zarr dtype of a cache dtype: bfloat16 as uint16 bits, float8_e4m3 codes as uint8."""
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32", "int8": "int8", "float8_e4m3": "uint8"}[
        dtype
    ]


def is_eight_bit(dtype: str) -> bool:
    return dtype in EIGHT_BIT


def decode_scale(a: np.ndarray) -> torch.Tensor:
    """Stored scale rows -> a tensor of the scale's type, known from the stored numpy dtype: uint16 holds
    bfloat16 bits, float16 is a store's from before bfloat16 scales."""
    return decode(a, scale_torch_dtype(a.dtype))


def scale_dtype_name(stored: Any) -> str:
    """The scale type of a scale array stored as numpy dtype ``stored``: "bfloat16" (uint16 bits) or "float16"."""
    return "bfloat16" if np.dtype(stored) == np.uint16 else "float16"


def scale_torch_dtype(stored: Any) -> torch.dtype:
    """The torch dtype scales stored as numpy dtype ``stored`` are held in (bfloat16 for uint16 bits, else float16)."""
    return SCALE_TORCH_DTYPES[scale_dtype_name(stored)]


def stored_bytes_per_row(channels: int, dtype: str) -> int:
    """Bytes one token row of C channels takes in a cache of ``dtype`` (8-bit: codes plus its 2-byte scale)."""
    return channels + 2 if is_eight_bit(dtype) else channels * np.dtype(storage_dtype(dtype)).itemsize


def quantize(x: torch.Tensor, dtype: str, scale_dtype: str = SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of tap rows x (..., C) on x's device: codes (..., C) int8 or uint8 (fp8 bits), one scale
    per row (...,) of ``scale_dtype`` (bfloat16; float16 in stores written before), max|x| / top rounded to
    nearest; codes are clamped to +-top (where the scale rounded down, the largest |x| moves by at most half a
    code step). A float16 scale that overflows comes back as inf (the caller reports it)."""
    code_type, top = EIGHT_BIT[dtype]
    x = x.float()
    scale = (x.abs().amax(dim=-1) / top).to(SCALE_TORCH_DTYPES[scale_dtype])  # (...,)
    s = scale.float().unsqueeze(-1)
    y = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0).clamp(-top, top)
    if dtype == "int8":
        return torch.round(y).to(torch.int8), scale
    return y.to(code_type).view(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: str, out: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (..., C) and scales (...,) of a cache of ``dtype`` -> values of dtype ``out``, on the codes' device."""
    values = codes.view(torch.float8_e4m3fn) if dtype == "float8_e4m3" else codes
    return (values.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(out)


def round_trip(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """x as a cache of ``dtype`` gives it back (float32): what training reads for these values."""
    if is_eight_bit(dtype):
        return dequantize(*quantize(x, dtype), dtype)
    return x.to(TORCH_DTYPES[dtype]).float()


def decode_array(codes: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored numpy arrays of a tap (and its ``<tap>_scale`` for 8-bit caches) -> float32 values: the decode
    for plain zarr, dask or xarray users (docs/store.md)."""
    t = decode(codes, dtype)
    if is_eight_bit(dtype):
        return dequantize(t, decode_scale(np.asarray(scale)), dtype).numpy()
    return t.float().numpy()


def encode(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tap tensor -> the numpy array that is written (its storage dtype; 8-bit: the codes, see ``quantize``)."""
    if is_eight_bit(dtype):
        return quantize(t.detach().cpu(), dtype)[0].numpy()
    return storage_view(t.detach().cpu().to(TORCH_DTYPES[dtype]).contiguous())


def storage_numpy_dtype(dtype: str | torch.dtype) -> np.dtype:
    """The numpy dtype that holds a cache dtype (name or torch dtype) in memory and on storage."""
    if isinstance(dtype, str):
        return np.dtype(storage_dtype(dtype))
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def storage_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as the numpy array that stores them (bfloat16 as uint16 bits); no copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def decode(a: np.ndarray, dtype: str | torch.dtype) -> torch.Tensor:
    """Stored numpy rows -> a tensor of the cache dtype (a name or a torch dtype); no copy where possible."""
    a = np.ascontiguousarray(a)
    if dtype in ("bfloat16", torch.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


AUTO_MIN_RATIO = 1.5  # "auto" compresses an array when lz4 saves at least a third of its bytes (docs/store.md)


def auto_compressors(samples: dict[str, np.ndarray], min_ratio: float = AUTO_MIN_RATIO) -> dict[str, str]:
    """``--compressor auto``: for each array (a sample of its stored rows), "lz4" when lz4 shrinks it at least
    ``min_ratio`` times, else "none" (dense activations: decoding would cost CPU and save nothing)."""
    out = {}
    for name, rows in samples.items():
        rows = np.ascontiguousarray(rows)
        codec = compressor_codecs("lz4")[0]
        packed = _numcodec_of(codec).encode(rows)
        out[name] = "lz4" if rows.nbytes >= min_ratio * len(packed) else "none"
    return out


def _numcodec_of(codec: Any) -> Any:
    import numcodecs

    return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=numcodecs.Blosc.SHUFFLE)


def compressor_codecs(name: str) -> list[Any]:
    """The bytes-to-bytes chain of a chunk: compressor, then a crc32c checksum."""
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if name == "none":
        return [Crc32cCodec()]
    raise StoreError(f"unknown compressor {name!r}; use one of {', '.join(COMPRESSORS)}")


def compressor_record(name: str, per_array: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"name", "configuration"}`` of the compressor, as zarr writes codecs; "auto" records each array's choice."""
    if name == "auto":
        return {
            "name": "auto",
            "configuration": {
                "min_ratio": AUTO_MIN_RATIO,
                "arrays": dict(per_array or {}),
                "codec": compressor_record("lz4")["configuration"],
            },
        }
    codecs = compressor_codecs(name)[:-1]
    if not codecs:
        return {"name": "none", "configuration": {}}
    d = codecs[0].to_dict()
    return {"name": name, "configuration": {"codec": d["name"], **d.get("configuration", {})}}


def _walk(codecs: Any, role: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, {"name", "configuration"}) of every codec, depth first: "array" (the array's own chain),
    "chunk" (the inner chunks of a shard) and "index" (a shard's index)."""
    for codec in codecs or ():
        yield role, codec.to_dict()
        yield from _walk(getattr(codec, "codecs", ()), "chunk")
        yield from _walk(getattr(codec, "index_codecs", ()), "index")


def codec_names(arr: zarr.Array) -> list[str]:
    """Names of every codec of an array, inner chunk codecs of a shard included."""
    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    return [str(d["name"]) for _, d in _walk(codecs, "array")]


def chunk_codec_labels(arr: zarr.Array) -> list[str]:
    """The codec chain of a chunk (inside its shard), e.g. ["bytes", "blosc(lz4, shuffle)", "crc32c"]."""
    walked = list(_walk(arr.metadata.codecs, "array"))
    role = "chunk" if any(d["name"] == "sharding_indexed" for _, d in walked) else "array"
    labels = []
    for r, d in walked:
        conf = d.get("configuration", {}) or {}
        if r != role:
            continue
        if d["name"] == "blosc":
            labels.append(f"blosc({conf.get('cname')}, {conf.get('shuffle')})")
        elif d["name"] == "zstd":
            labels.append(f"zstd({conf.get('level')})")
        else:
            labels.append(str(d["name"]))
    return labels


def check_codecs(arr: zarr.Array, where: str) -> None:
    """Refuse an array whose codecs featcache never writes (before any chunk is decoded)."""
    if arr.metadata.zarr_format != 3:
        raise StoreError(f"{where} is not a Zarr v3 array; this store was not written by featcache")
    bad = sorted(set(codec_names(arr)) - ALLOWED_CODECS)
    if bad:
        raise StoreError(
            f"{where} declares codec(s) {', '.join(bad)}, which featcache never writes and does not "
            "decode; this store was not written by featcache or has been altered: re-extract it"
        )
