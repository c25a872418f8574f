"""The Zarr feature store: format (feature_store), codecs, shard-aligned writer, readers, verification, and
lazy dask/xarray views (lazy_views).

    from featcache.store import open_store, open_reader
    store = open_store("cache.zarr")
    reader = open_reader(store.split("train"), ["block12"], batch_size=64)
    store.split("train").to_xarray()
"""

from .codecs import decode, decode_array, encode, storage_dtype
from .feature_store import FeatureStore, SplitHandle, open_store
from .reader import Batch, CacheReader, TapDataset, open_reader

__all__ = ["Batch", "CacheReader", "FeatureStore", "SplitHandle", "TapDataset", "decode", "decode_array", "encode",
           "open_reader", "open_store", "storage_dtype"]
