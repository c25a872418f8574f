"""featcache: run a frozen timm backbone once, cache its taps in Zarr, train side networks from the cache."""

__version__ = "0.1.0"
