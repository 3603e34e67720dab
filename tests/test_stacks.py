"""Frame capture on the calling thread and the intake encoding of the frames."""

import json
import sys

import pytest

from beatlib import stacks
from beatlib.config import Config
from beatlib.errors import ErrorSnapshot
from beatlib.sanitize import REDACTED
from beatlib.stacks import capture_stack, capture_tb_frames
from tests.events import encode_one


def config(**kw: object) -> Config:
    return Config(environ={}, **kw)


def encode(frames: list, cfg: Config) -> list[dict]:
    """Encode as the worker does, inside a minimal error event (validated)."""
    snap = ErrorSnapshot.from_message("m", config=cfg, stack=False)
    snap.log_frames = frames
    return encode_one(snap, cfg)["log"]["stacktrace"]


def tb_of(fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # noqa: B036
        return exc.__traceback__
    raise AssertionError("did not raise")


def inner(password: str, items: list) -> None:
    local_note = "hello"  # noqa: F841
    raise ValueError("boom")  # the raise line


def outer() -> None:
    inner("hunter2", [1, 2, 3])


def test_frames_are_innermost_first_with_names_and_locals() -> None:
    frames = capture_tb_frames(tb_of(outer), config(), with_locals=True)
    assert [f.function for f in frames] == ["inner", "outer", "tb_of"]
    top = frames[0]
    assert top.module == __name__ and top.filename.endswith("test_stacks.py")
    assert top.abs_path == __file__ and top.library_frame is False
    assert top.locals == {"password": "hunter2", "items": [1, 2, 3], "local_note": "hello"}
    assert capture_tb_frames(tb_of(outer), config(), with_locals=False)[0].locals is None
    assert capture_tb_frames(tb_of(outer), config(capture_locals=False), True)[0].locals is None


def test_intake_frames_have_source_and_redacted_vars() -> None:
    frames = encode(capture_tb_frames(tb_of(outer), config(), with_locals=True), config())
    top = frames[0]
    assert top["context_line"].strip() == 'raise ValueError("boom")  # the raise line'
    assert len(top["pre_context"]) == 2 and len(top["post_context"]) == 2
    assert top["vars"] == {"password": REDACTED, "items": [1, 2, 3], "local_note": "hello"}
    assert top["lineno"] == inner.__code__.co_firstlineno + 2


def test_stdlib_and_site_packages_frames_are_library_frames() -> None:
    frames = capture_tb_frames(tb_of(json.loads, "{"), config(), with_locals=True)
    json_frames = [f for f in frames if f.module.startswith("json")]
    assert json_frames and all(f.library_frame and f.locals is None for f in json_frames)
    assert json_frames[0].filename == "json/decoder.py"
    import jsonschema

    tb = tb_of(jsonschema.Draft7Validator({"type": "string"}).validate, 1)
    lib = [f for f in capture_tb_frames(tb, config(), True) if f.module.startswith("jsonschema")]
    assert lib and all(f.library_frame for f in lib)
    wire = encode(frames, config())  # library frames get no source by default
    assert all("context_line" not in f for f in wire if f["library_frame"])


def test_include_and_exclude_paths_override() -> None:
    cfg = config(include_paths=["json"], exclude_paths=["json.decoder", __name__])
    frames = capture_tb_frames(tb_of(json.loads, "{"), cfg, with_locals=True)
    by_module = {f.module: f.library_frame for f in frames}
    assert by_module == {"json": False, "json.decoder": True, __name__: True}


def test_beatlib_frames_are_library_frames() -> None:
    def boom() -> None:
        capture_stack(None)  # type: ignore[arg-type]  # fails inside beatlib

    frames = capture_tb_frames(tb_of(boom), config(), with_locals=True)
    assert frames[0].module == "beatlib.stacks" and frames[0].library_frame


def test_classification_is_cached_per_file() -> None:
    stacks._CLASSIFIERS.clear()
    capture_tb_frames(tb_of(outer), config(), with_locals=False)
    assert {k[0] for k in stacks._CLASSIFIERS[((), ())]} == {__file__}


def recurse(n: int) -> None:
    if n == 0:
        raise RuntimeError("bottom")
    recurse(n - 1)


def test_long_stacks_keep_both_ends_and_mark_the_cut() -> None:
    frames = capture_tb_frames(tb_of(recurse, 100), config(stack_trace_limit=10), True)
    assert len(frames) == 11
    assert frames[5].function == "<92 frames omitted>" and frames[5].lineno is None
    assert [f.function for f in frames[:5]] == ["recurse"] * 5
    assert frames[-1].function == "tb_of"
    encode(frames, config())
    assert capture_tb_frames(tb_of(recurse, 3), config(stack_trace_limit=0), True) == []


def test_capture_stack_starts_at_the_caller_without_locals() -> None:
    def caller(skip: int = 0) -> list:
        return capture_stack(config(), skip)

    frames = caller()
    assert frames[0].function == "caller" and frames[1].function.startswith("test_capture")
    assert all(f.locals is None for f in frames)
    assert caller(skip=1)[0].function == frames[1].function
    assert caller(skip=10**6) == []
    encode(frames, config())


def test_code_without_source_file() -> None:
    namespace: dict = {"__name__": "generated"}
    exec("def gen():\n    raise KeyError('k')\n", namespace)  # noqa: S102
    frames = capture_tb_frames(tb_of(namespace["gen"]), config(), True)
    assert frames[0].abs_path == "<string>" and frames[0].library_frame is False
    assert "context_line" not in encode(frames, config())[0]


@pytest.mark.parametrize("limit", [1, 2, 50])
def test_recursion_error_ten_thousand_frames_deep(limit: int) -> None:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_050)
    try:
        tb = tb_of(recurse, 10_000)
    finally:
        sys.setrecursionlimit(old)
    frames = capture_tb_frames(tb, config(stack_trace_limit=limit), True)
    assert len(frames) == limit + 1
    assert any(f.function.endswith("frames omitted>") for f in frames)
    assert frames[0].function == "recurse"
    encode(frames, config())
