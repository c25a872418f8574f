"""featcache: run a frozen timm backbone once, cache its taps in Zarr, train side networks from the cache."""

import os

# OpenMP threads that spin while waiting starve the data loader, the shard writer and the reader
# threads on a few shared cores: measured 2x slower EfficientNet-Lite0 forwards and 5-50x slower small
# ops on 2 busy cores (docs/store.md). libgomp reads this when torch loads, so it only takes effect
# when featcache is imported before torch; an explicit value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
