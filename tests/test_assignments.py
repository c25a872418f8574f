import pytest

from featcache.assignments import parse_assignments, parse_grid, parse_value
from featcache.errors import UsageError


@pytest.mark.parametrize(
    "text,value",
    [
        ("224", 224),
        ("1e-3", 1e-3),
        ("0.5", 0.5),
        ("true", True),
        ("False", False),
        ("none", None),
        ("avg", "avg"),
        ("[1, 2]", [1, 2]),
        ('"7"', "7"),
    ],
)
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_assignments_and_grid():
    assert parse_assignments(["img_size=224", "global_pool=avg"]) == {"img_size": 224, "global_pool": "avg"}
    assert parse_grid(["lr=1e-3,1e-2", "rank=4,8"]) == {"lr": [1e-3, 1e-2], "rank": [4, 8]}


@pytest.mark.parametrize(
    "items,fn,msg",
    [
        (["img_size"], parse_assignments, "expects KEY=VALUE"),
        (["=3"], parse_assignments, "expects KEY=VALUE"),
        (["a=1", "a=2"], parse_assignments, "twice"),
        (["lr="], parse_grid, "empty value"),
        (["lr=1,,2"], parse_grid, "empty value"),
        (["lr=1", "lr=2"], parse_grid, "twice"),
    ],
)
def test_bad_assignments(items, fn, msg):
    with pytest.raises(UsageError, match=msg):
        fn(items)
