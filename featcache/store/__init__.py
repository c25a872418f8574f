"""The Zarr feature store: format (feature_store), codecs, shard-aligned writer, readers, verification, and
lazy dask/xarray views (lazy_views).

    from featcache.store import open_store, open_reader
    store = open_store("cache.zarr")
    reader = open_reader(store.split("train"), ["block12"], batch_size=64)
    split_to_xarray(store.split("train"))               # from featcache.store.lazy_views
"""

from .codecs import decode, decode_array, encode, storage_dtype
from .feature_store import FeatureStore, SplitHandle, open_store
from .lazy_views import split_to_dask, split_to_xarray
from .reader import Batch, CacheReader, TapDataset, open_reader

__all__ = [
    "Batch",
    "CacheReader",
    "FeatureStore",
    "SplitHandle",
    "TapDataset",
    "decode",
    "decode_array",
    "encode",
    "open_reader",
    "open_store",
    "split_to_dask",
    "split_to_xarray",
    "storage_dtype",
]
