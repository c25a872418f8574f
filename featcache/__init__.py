"""featcache: run a frozen timm backbone once, cache its taps in Zarr, train side networks from the cache.

The Python API (docs/api.md), loaded on first use so that ``import featcache`` stays light (no torch,
timm or zarr until a name is used; the CLI's ``--help`` relies on it)::

    import featcache
    store = featcache.open_store("cache.zarr")          # featcache.store.feature_store
    featcache.extract(spec, data, out, ...)             # featcache.extraction
    featcache.train(store, "last", out, ...)            # featcache.training
    predictor = featcache.load_predictor("runs/last")   # featcache.infer
"""

import importlib as _importlib
import os as _os
from typing import Any as _Any

# OpenMP threads that spin while waiting starve the loader, writer and reader threads on a few shared
# cores (docs/store.md). libgomp reads this when torch loads: it takes effect when featcache is imported
# before torch; an explicit value in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access, PEP 562)
_API = {
    "open_store": "featcache.store.feature_store",
    "extract": "featcache.extraction",
    "train": "featcache.training",
    "load_predictor": "featcache.infer",
    "BackboneSpec": "featcache.manifest",
    "ExtractOptions": "featcache.options",
    "TrainOptions": "featcache.options",
}

__all__ = list(_API)


def __getattr__(name: str) -> _Any:
    if name not in _API:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    module = _importlib.import_module(_API[name])
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
