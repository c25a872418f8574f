"""How tap values become stored bytes and back: storage dtypes and the codec chain of every array.

Zarr has no bfloat16: a bfloat16 cache is stored as uint16 bits (attribute ``featcache_dtype``), and
``encode`` / ``decode`` are the only places that know it. Every chunk ends in a crc32c checksum; only
the codecs in ``ALLOWED_CODECS`` are ever decoded.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from featcache.errors import StoreError
from featcache.vocabulary import COMPRESSORS

# Codecs featcache reads. Each only reshapes, compresses or checksums bytes; anything else (an
# object codec that unpickles, say, registered by some installed package) is refused before a
# chunk is decoded, so opening a store never runs code from it.
ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "transpose", "vlen-utf8",
                            "vlen-bytes"})
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(dtype: str) -> str:
    """The zarr dtype of a cache dtype. Zarr has no bfloat16: it is stored as uint16 bits."""
    return {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}[dtype]


def encode(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tap tensor -> the numpy array that is written (its storage dtype)."""
    return storage_view(t.detach().cpu().to(TORCH_DTYPES[dtype]).contiguous())


def storage_numpy_dtype(dtype: str | torch.dtype) -> np.dtype:
    """The numpy dtype that holds a cache dtype (name or torch dtype) in memory and on storage."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return np.dtype(storage_dtype(name))


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


def compressor_codecs(name: str) -> list[Any]:
    """The bytes-to-bytes chain of a chunk: compressor, then a crc32c checksum."""
    if name == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if name == "none":
        return [Crc32cCodec()]
    raise StoreError(f"unknown compressor {name!r}; use one of {', '.join(COMPRESSORS)}")


def compressor_record(name: str) -> dict[str, Any]:
    """``{"name", "configuration"}`` of the compressor, as zarr writes codecs."""
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
        raise StoreError(f"{where} declares codec(s) {', '.join(bad)}, which featcache never writes and does not "
                         "decode; this store was not written by featcache or has been altered: re-extract it")
