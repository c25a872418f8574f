"""``torchvision:NAME[:ROOT][:train|:test]``: a torchvision dataset already on disk (never downloaded)."""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch

from featcache.errors import DataError

from .base import Sample


class TorchvisionSource:
    """A torchvision dataset that is already on disk; featcache never downloads."""

    def __init__(self, name: str, root: str | None, part: str | None) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, name, None)
        if cls is None or not inspect.isclass(cls):
            raise DataError(f"torchvision has no dataset {name!r}; see torchvision.datasets (e.g. MNIST, CIFAR10)")
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {}
        root = root or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "featcache", "data"
        )
        if "root" in params:
            kwargs["root"] = root
        if "download" in params:
            kwargs["download"] = False
        if "train" in params:
            kwargs["train"] = part != "test"
        elif "split" in params and part:
            kwargs["split"] = part
        try:
            self._ds = cls(**kwargs)
        except Exception as err:
            raise DataError(
                f"torchvision dataset {name} is not available under {root} ({str(err)[:160]}); featcache "
                f"never downloads: place the files there first"
            ) from None
        if len(self._ds) == 0:
            raise DataError(f"torchvision dataset {name} under {root} is empty")
        self.spec = f"torchvision:{name}" + (f":{root}" if "root" in params else "") + (f":{part}" if part else "")
        self.classes = [str(c) for c in getattr(self._ds, "classes", [])]
        targets = getattr(self._ds, "targets", None)
        self._labels = np.asarray(targets, dtype=np.int64) if targets is not None else None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> Sample:
        image, label = self._ds[index]
        if isinstance(image, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return Sample(image.convert("RGB"), int(label), str(index))

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray([int(self._ds[i][1]) for i in range(len(self._ds))], dtype=np.int64)
        if not self.classes:
            self.classes = [str(c) for c in range(int(self._labels.max()) + 1)]
        return self._labels

    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self._ds))]
