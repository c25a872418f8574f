"""Lazy, decoded views of a split for dask and xarray: ``split_to_dask(split)``, ``split_to_xarray(split)``.

Only the images of completed shards are included, as for the readers and training: an incomplete split
gives shorter arrays, and xarray's ``image`` coordinate holds the stored image indices. Each dask block is
one shard of one tap, read by ``dask.array.from_zarr`` (zarr checks every chunk's crc32c) and decoded to
float32 by ``codecs.decode_array``, the one function that knows how taps are stored (bfloat16 as uint16
bits; 8-bit codes times the per-row scales of ``<tap>_scale``, read block by block alongside).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.errors import MissingDependencyError

from .codecs import SCALE_SUFFIX, decode_array, is_eight_bit
from .feature_store import SplitHandle, tap_dimension_names

if TYPE_CHECKING:
    import dask.array
    import xarray


def decode_block(block: np.ndarray, cache_dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored rows of a tap (and their 8-bit scales) -> float32 numpy (a dask block function: module level,
    so it pickles)."""
    if scale is not None and scale.ndim == block.ndim:  # passed with a trailing axis of 1 so that blocks align
        scale = scale[..., 0]
    return decode_array(block, cache_dtype, scale)


def _completed_runs(split: SplitHandle) -> tuple[list[int], list[tuple[int, int]]]:
    """(completed shard ids, [start, stop) runs of consecutive completed shards)."""
    shards = [int(k) for k in np.flatnonzero(split.completed_shards())]
    runs: list[tuple[int, int]] = []
    for k in shards:
        start, stop = split.meta.shard_bounds(k)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return shards, runs


def split_to_dask(split: SplitHandle, taps: list[str] | None = None) -> dict[str, "dask.array.Array"]:
    """{tap: float32 dask array (images of completed shards, [views,] tokens, channels)}; nothing is read yet
    except that the completed shards' objects are checked to exist (zarr would read a lost one as zeros)."""
    import dask.array as da

    shards, runs = _completed_runs(split)
    dtype = split.store.manifest.dtype

    def completed(name: str) -> "dask.array.Array":
        arr = split.array(name)
        split.require_objects(name, shards)
        x = da.from_zarr(arr, chunks=(split.meta.shard_images, *arr.shape[1:]))
        if runs != [(0, split.num_samples)]:
            x = da.concatenate([x[a:b] for a, b in runs]) if runs else x[:0]
        return x

    out = {}
    for name in split.tap_names if taps is None else list(taps):
        split.tap(name)  # an unknown tap: StoreError naming the stored ones
        x = completed(name)
        meta = np.empty((0,) * x.ndim, dtype=np.float32)
        if is_eight_bit(dtype):  # the scales' blocks line up with the codes' (same images per block)
            out[name] = da.map_blocks(
                decode_block, x, dtype, completed(name + SCALE_SUFFIX)[..., None], dtype=np.float32, meta=meta
            )
        else:
            out[name] = x.map_blocks(decode_block, cache_dtype=dtype, dtype=np.float32, meta=meta)
    return out


def split_to_xarray(split: SplitHandle, taps: list[str] | None = None) -> "xarray.Dataset":
    """An ``xarray.Dataset`` over the completed images: one lazily decoded float32 variable per tap (dims as
    stored: image, [view,] token, channel), coordinates ``image``, ``labels``, ``ids``; attributes: the
    store's manifest, ``store``, ``split`` and ``featcache_split`` (the split's metadata)."""
    try:
        import xarray as xr
    except ImportError:
        raise MissingDependencyError(
            "SplitHandle.to_xarray needs the xarray package, which is not installed: "
            "pip install xarray (or use to_dask(), which needs only dask)"
        ) from None
    arrays = split_to_dask(split, taps)
    index = split.completed_indices()
    manifest = split.store.manifest
    data_vars: dict[str, Any] = {}
    for name, x in arrays.items():
        arr = split.tap(name)
        dims = tuple(
            arr.metadata.dimension_names or tap_dimension_names(manifest.taps, manifest.tap(name), split.meta.views)
        )
        data_vars[name] = xr.Variable(
            dims, x, attrs={"tap": manifest.tap(name).to_dict(), "cache_dtype": manifest.dtype}
        )
    coords = {
        "image": index,
        "labels": ("image", split.labels()[index]),
        "ids": ("image", np.asarray(split.ids(), dtype=str)[index]),
    }
    attrs = {
        **manifest.to_attrs(),
        "store": split.store.url,
        "split": split.name,
        "featcache_split": split.meta.to_attrs(),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
