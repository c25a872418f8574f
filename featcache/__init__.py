"""featcache: run a frozen timm backbone once, cache its taps in Zarr, train side networks from the cache.

The Python API (docs/api.md), loaded on first use so that ``import featcache`` stays light (no torch,
timm or zarr until a name is used; the CLI's ``--help`` relies on it)::

    import featcache
    store = featcache.open_store("cache.zarr")          # featcache.store.feature_store
    featcache.extract(spec, data, out, ...)             # featcache.extract
    featcache.train(store, "last", out, ...)            # featcache.train
    predictor = featcache.load_predictor("runs/last")   # featcache.infer
"""

import importlib as _importlib
import os as _os
import sys as _sys
import types as _types
from typing import Any as _Any

# OpenMP threads that spin while waiting starve the loader, writer and reader threads on a few shared
# cores (docs/store.md). libgomp reads this when torch loads: it takes effect when featcache is imported
# before torch; an explicit value in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access, PEP 562)
_API = {
    "open_store": "featcache.store.feature_store",
    "extract": "featcache.extract",
    "train": "featcache.train",
    "load_predictor": "featcache.infer",
    "BackboneSpec": "featcache.vocabulary",
    "ExtractOptions": "featcache.extract",
    "TrainOptions": "featcache.train",
}

__all__ = list(_API)


class CallableModule(_types.ModuleType):
    """A module that is also its main function: ``featcache.train(...)`` calls ``featcache.train.train(...)``.

    ``featcache.extract`` and ``featcache.train`` name both a submodule and the function the API documents.
    Python sets a package attribute to the submodule whenever that is first imported (by anyone, in any
    form), so the attribute cannot stay a plain function; instead the submodule itself is made callable
    (the documented ``module.__class__`` assignment), and ``import featcache.train as m``, ``mock.patch``
    targets and ``featcache.train(...)`` all work.
    """

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> _Any:  # inspect.signature(featcache.train) shows the function's
        import inspect

        return inspect.signature(getattr(self, self.__name__.rpartition(".")[2]))


def make_callable(module_name: str) -> None:
    """Make an imported module callable as its function of the same name (see ``CallableModule``)."""
    _sys.modules[module_name].__class__ = CallableModule


def __getattr__(name: str) -> _Any:
    if name not in _API:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    module = _importlib.import_module(_API[name])
    if module.__name__ == f"featcache.{name}":  # extract, train: the (callable) submodule itself
        return module
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
