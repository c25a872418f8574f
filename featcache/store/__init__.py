"""The Zarr feature store: format (feature_store), codecs, shard-aligned writer, readers, verification.

    from featcache.store import FeatureStore, open_reader
    store = FeatureStore.open("cache.zarr")
    reader = open_reader(store.split("train"), ["block12"], batch_size=64)
"""

from .codecs import decode, decode_array, encode, storage_dtype
from .feature_store import FeatureStore, SplitHandle
from .reader import Batch, CacheReader, TapDataset, open_reader

__all__ = ["Batch", "CacheReader", "FeatureStore", "SplitHandle", "TapDataset", "decode", "decode_array", "encode", "open_reader",
           "storage_dtype"]
