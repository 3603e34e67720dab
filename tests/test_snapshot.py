"""Capture on the calling thread: app values rendered to bounded builtins at once."""

import json
import math
import os
import threading

from beatlib.snapshot import render


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def strict_json(value: object) -> object:
    """What the server would see: strict JSON, UTF-8 encodable."""
    return json.loads(json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8"))


def test_render_bounds_collections_and_strings() -> None:
    out = render({"items": list(range(100)), "text": "y" * 1000}, 10, 10, 200)
    assert out["items"][:10] == list(range(10))
    assert out["items"][10] == "(90 more elements)"
    assert len(out["text"]) == 200
    big = render({i: i for i in range(10**5)}, 10, 10, 200)
    assert len(big) == 11 and big["<truncated>"] == "(99990 more elements)"
    assert render((1, 2), 10, 10, 200) == [1, 2]


def test_cycles_and_depth_are_summarised_never_shown_raw() -> None:
    lst: list = [1]
    lst.append(lst)
    d: dict = {"a": 1}
    d["self"] = d
    out = strict_json(render({"lst": lst, "d": d}, 10, 10, 200))
    assert out["lst"] == [1, "<list of 2 items: cycle>"]
    assert out["d"]["self"] == "<dict of 2 items: cycle>"
    deep: dict = {"password": "hunter2"}
    for _ in range(100):
        deep = {"next": deep}
    text = json.dumps(strict_json(render(deep, 10, 10, 200)))
    assert "hunter2" not in text and "nested" in text  # cut, no RecursionError
    shared = [1]
    assert render([shared, shared], 10, 10, 200) == [[1], [1]]  # not a cycle


def test_mapping_likes_become_dicts() -> None:
    class Headers:  # like werkzeug's: items() and keys(), not a Mapping
        def items(self):
            return [("Authorization", "Bearer x"), ("Accept", "*/*")]

        def keys(self):
            return ["Authorization", "Accept"]

    assert render(Headers(), 10, 10, 200) == {"Authorization": "Bearer x", "Accept": "*/*"}
    env = render(os.environ, 10, 1000, 200)
    assert isinstance(env, dict) and env.get("PATH", "")[:20] == os.environ.get("PATH", "")[:20]


def test_objects_are_repr_d_now_on_the_calling_thread() -> None:
    seen = []

    class Lazy:
        def __repr__(self) -> str:
            seen.append(threading.current_thread())
            return "<Lazy>"

    assert render({"obj": Lazy()}, 10, 10, 200) == {"obj": "<Lazy>"}
    assert seen == [threading.current_thread()]


def test_odd_values_are_json_safe() -> None:
    class BadLen(list):
        def __len__(self) -> int:
            raise RuntimeError("boom")

    value = {
        "nan": math.nan, "inf": -math.inf, "huge": 10**5000, "bytes": b"\xff\xfe\x00",
        "obj": Unreprable(), 3: "int key", "surrogate": "\ud800", "badlen": BadLen(range(20)),
    }  # fmt: skip
    out = strict_json(render(value, 10, 10, 200))
    assert out["nan"] == "nan" and out["inf"] == "-inf"
    assert out["huge"] == "<unrepresentable int object>"  # int too large for str()
    assert out["bytes"] == "b'\\xff\\xfe\\x00'"
    assert out["obj"] == "<unrepresentable Unreprable object>"
    assert out["3"] == "int key"
    assert out["surrogate"] == "?"
    assert isinstance(out["badlen"], str | list)
