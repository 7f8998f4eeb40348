"""The client core's pending ring (ids -> entries) against a dict model, and its read path."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teomq._core.client_core import ClientCore
from teomq._core.frame_codec import encode_frame
from teomq.errors import ProtocolError
from teomq.protocol import ErrorCode, Flag, FrameType


def make_core(frames: list | None = None, results: list | None = None) -> ClientCore:
    frames = frames if frames is not None else []
    results = results if results is not None else []
    return ClientCore(1 << 20, lambda *f: frames.append(f), lambda *r: results.append(r),
                      lambda mid, exc: results.append(("callback-error", mid, exc)))


ops = st.lists(st.one_of(
    st.tuples(st.just("register"), st.integers(0, 0)),
    st.tuples(st.just("pop"), st.integers(0, 600)),
    st.tuples(st.just("expire"), st.integers(0, 600)),
), max_size=400)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pending_ring_matches_a_dict(seq):
    core = make_core()
    model: dict[int, object] = {}
    next_id = 1
    low = 1
    for op, arg in seq:
        if op == "register":
            entry = object()
            mid = core.register(entry, False)
            assert mid == next_id
            model[mid] = entry
            next_id += 1
        elif op == "pop":
            assert core.pop(arg) is model.pop(arg, None)
        else:
            got = core.expire_upto(arg)
            want = sorted((m, e) for m, e in model.items() if low <= m <= arg)
            assert [(m, id(e)) for m, e in got] == [(m, id(e)) for m, e in want]
            for m, _ in want:
                del model[m]
            low = max(low, min(arg, next_id - 1) + 1)
        assert core.npending == len(model)
    rest = core.take_all()
    assert [m for m, _ in rest] == sorted(model)
    assert core.npending == 0


def test_ring_grows_when_an_old_request_is_still_pending():
    core = make_core()
    first = object()
    assert core.register(first, False) == 1
    for _ in range(2000):  # wraps the initial 256 slots many times over
        core.pop(core.register(object(), False))
    assert core.pop(1) is first
    assert core.npending == 0


def test_reply_resolves_future_and_callback_in_one_feed():
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        calls = []
        core = make_core()
        m1 = core.register(fut, True)
        m2 = core.register(lambda *a: calls.append(a), False)
        core.feed(encode_frame(FrameType.REPLY, 0, m1, b"one") + encode_frame(FrameType.REPLY, 0, m2, b"two"))
        assert fut.result() == b"one"
        assert calls == [(m2, b"two", None)]
        assert core.replies == 2 and core.npending == 0
    finally:
        loop.close()


def test_unknown_reply_and_other_frames_go_to_python():
    frames: list = []
    core = make_core(frames)
    core.feed(encode_frame(FrameType.REPLY, 0, 99, b"late") + encode_frame(FrameType.PING, 0, 7))
    assert frames == [(FrameType.REPLY, 0, 99, b"late"), (FrameType.PING, 0, 7, b"")]


def test_sync_handler_answers_in_the_core_and_leaves_the_rest_to_python():
    results: list = []
    core = make_core(results=results)
    core.max_send = 10
    core.handler = lambda data: {b"a": b"A", b"none": None, b"big": b"x" * 11}[data]
    core.feed(encode_frame(FrameType.DELIVER, 0, 1, b"a")
              + encode_frame(FrameType.DELIVER, Flag.REDELIVERED, 2, b"none")
              + encode_frame(FrameType.DELIVER, 0, 3, b"big")
              + encode_frame(FrameType.DELIVER, 0, 4, b"boom"))
    assert core.wbuf.take() == encode_frame(FrameType.ANSWER, 0, 1, b"A")
    assert [r[:3] for r in results] == [(2, b"none", None), (3, b"big", b"x" * 11), (4, b"boom", None)]
    assert isinstance(results[-1][3], KeyError)
    assert (core.received, core.answered, core.redelivered) == (4, 1, 1)


def test_bad_frame_poisons_the_core():
    core = make_core()
    with pytest.raises(ProtocolError) as info:
        core.feed(b"GARBAGE")
    assert info.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError):
        core.feed(encode_frame(FrameType.PING, 0, 1))


def test_frames_split_byte_by_byte():
    frames: list = []
    core = make_core(frames)
    data = b"".join(encode_frame(FrameType.PING, 0, i, b"p" * i) for i in range(5))
    for i in range(len(data)):
        core.feed(data[i:i + 1])
    assert [f[2] for f in frames] == list(range(5))
