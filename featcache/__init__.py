"""featcache: run a frozen timm backbone once, cache its taps in Zarr, train side networks from the cache."""

import os

# OpenMP threads that spin while waiting starve the loader, writer and reader threads on a few shared
# cores (docs/store.md). libgomp reads this when torch loads: it takes effect when featcache is imported
# before torch; an explicit value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
