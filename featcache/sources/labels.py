"""Labels as users write them -> int64 labels (-1 = unknown) and class names, one rule for every format.

- integers (or strings that are integers, as a CSV holds them): the label is the integer, the classes
  are ``"0" .. str(max)``;
- other strings: class names; the classes are the distinct names sorted (as ImageFolder sorts its class
  folders), the label is the position of the name;
- ``None`` or an empty string: unknown (-1), e.g. for ``predict`` on unlabelled images; ``-1`` too.
Anything else (a float, a list, a mix of integers and names) is a DataError naming the row.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from featcache.errors import DataError

_INTEGER = re.compile(r"[+-]?\d+")


def encode_labels(values: Sequence[object], where: Callable[[int], str]) -> tuple[np.ndarray, list[str]]:
    """(labels int64, classes) for the labels as written; ``where(i)`` names row i in error messages."""
    known = [(i, v) for i, v in enumerate(values) if v is not None and v != ""]
    if not known:
        return np.full(len(values), -1, dtype=np.int64), []
    for i, v in known:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, str)):
            raise DataError(
                f"{where(i)}: label {v!r} is a {type(v).__name__}, not an integer or a class name; "
                "write integer labels or class names"
            )
    if all(isinstance(v, str) and _INTEGER.fullmatch(v.strip()) for _, v in known) or all(
        not isinstance(v, str) for _, v in known
    ):
        labels = np.full(len(values), -1, dtype=np.int64)
        for i, v in known:
            labels[i] = int(v.strip()) if isinstance(v, str) else int(v)
            if labels[i] < -1:
                raise DataError(f"{where(i)}: label {v!r} is negative; labels are 0, 1, ... (-1 or empty for unknown)")
        top = int(labels.max())
        return labels, [str(c) for c in range(top + 1)] if top >= 0 else []
    numbers = [i for i, v in known if not isinstance(v, str)]
    if numbers:
        i = numbers[0]
        raise DataError(
            f"{where(i)}: label {values[i]!r} is a number where other rows hold class names; "
            "write either integer labels or class names"
        )
    classes = sorted({str(v) for _, v in known})
    position = {name: k for k, name in enumerate(classes)}
    labels = np.full(len(values), -1, dtype=np.int64)
    for i, v in known:
        labels[i] = position[str(v)]
    return labels, classes
