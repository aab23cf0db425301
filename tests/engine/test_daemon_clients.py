"""The engine process against hostile and misbehaving clients: malformed hellos, out-of-range
fields, oversized prompts, a long prompt from one client while another types, a client that
stops reading and one that is suspended (SIGSTOP). The others keep being served."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack
import pytest

from engine import protocol as P
from gemma_lsp.engine_client import EngineClient, EngineError
from tests.conftest import reference_cases
from tests.engine import test_daemon_process as daemon_tests
from tests.engine.test_daemon_process import Engine, text_of

engine = daemon_tests.engine  # the same fixture: a real engine process in a private dir

PROMPT = reference_cases()[2]["prompt"]  # a short one
LONG = "".join(c["prompt"] for c in reference_cases()[:6])
COUNTING = ", ".join(str(i) for i in range(1, 40)) + ","  # the model keeps counting


def frame(fields: Any) -> bytes:
    data = msgpack.packb(fields, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


def connect(engine: Engine, hello: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(engine.sock))
    s.settimeout(60)
    if hello:
        s.sendall(P.encode(P.Hello(client="raw")))
        assert isinstance(P.read_frame(s), P.HelloReply)
    return s


def served_promptly(c: EngineClient, n: int = 3) -> None:
    """`n` short completions, each answered (a hang here is the defect, not slowness)."""
    for _ in range(n):
        h = c.generate(PROMPT, max_tokens=2)
        while not isinstance(h.next(90), P.Done):
            pass


def test_malformed_hellos_get_an_error_reply(engine: Engine) -> None:
    engine.start("--no-persist")
    cases = [
        ({"type": "hello", "version": 1, "client": 42}, "hello.client"),
        ({"type": "hello", "version": "1", "client": "x"}, "hello.version"),
        ({"type": "hello", "version": 1, "client": "x", "color": "red"}, "color"),
        (["hello", 1], "map"),
        ({"type": "status", "id": 1}, "expected hello"),
    ]
    for fields, named in cases:
        s = connect(engine, hello=False)
        s.sendall(frame(fields))
        reply = P.read_frame(s)
        assert isinstance(reply, P.Error), fields
        assert reply.code == P.E_BAD_REQUEST and named in reply.message, reply
        assert P.read_frame(s) is None  # then the connection closes
        s.close()
    served_promptly(engine.client(), 1)


def test_out_of_range_fields_are_bad_requests_naming_the_field(engine: Engine) -> None:
    engine.start("--no-persist")
    c = engine.client()
    for opts, named in [({"seed": -1}, "seed"), ({"max_tokens": -5}, "max_tokens"),
                        ({"temperature": -1.0}, "temperature"), ({"top_p": 2.0}, "top_p"),
                        ({"priority": -3}, "priority"), ({"logprobs": 50}, "logprobs"),
                        ({"deadline_ms": float("nan")}, "deadline_ms")]:
        h = c.generate(PROMPT, **opts)
        with pytest.raises(EngineError) as err:
            h.next(60)  # the reply carries the request's id: no wait forever
        assert err.value.code == P.E_BAD_REQUEST and named in str(err.value), opts
    text, done = text_of(c.generate(PROMPT, max_tokens=2, seed=3, temperature=0.5))
    assert done.n_tokens == 2


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_huge_prompts_are_refused_by_size_before_tokenizing(engine: Engine) -> None:
    proc = engine.start("--no-persist")
    c = engine.client()
    served_promptly(c, 1)
    before = _peak_rss_mb(proc.pid)
    # past what the model's context can hold (context x the longest token), under the frame
    # limit: refused with the limit named, without tokenizing ~80 bytes of RSS per byte
    h = c.generate("x = 1\n" * 1_000_000, max_tokens=1)  # 6 MB
    with pytest.raises(EngineError) as err:
        h.next(60)
    assert err.value.code == P.E_TOO_LONG and "bytes" in str(err.value)
    assert "holds at most" in str(err.value)
    h = c.generate("y" * (P.MAX_PROMPT_BYTES + 1), max_tokens=1)  # past the protocol's bound
    with pytest.raises(EngineError) as err:
        h.next(60)
    assert err.value.code == P.E_BAD_REQUEST and f"{P.MAX_PROMPT_BYTES}-byte" in str(err.value)
    grew = _peak_rss_mb(proc.pid) - before
    assert grew < 300, f"peak RSS grew {grew:.0f} MB refusing two big prompts"
    served_promptly(c, 1)


def test_a_short_request_overtakes_another_clients_long_prompt(engine: Engine) -> None:
    engine.start("--no-persist")
    long_client, typist = engine.client(), engine.client()
    slow = long_client.generate(LONG + LONG, max_tokens=1)  # same priority, ~4,000 tokens
    deadline = time.monotonic() + 120
    while not any(j["started"] for j in typist.status()["queue"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    h = typist.generate(PROMPT, max_tokens=1)
    _, done = text_of(h)
    # the long prompt is still being prefilled: the short one started within a chunk
    queue = typist.status()["queue"]
    assert [j["id"] for j in queue] == [slow.id], queue
    assert done.queue_ms < 60_000
    slow.cancel()


def test_a_client_that_stops_reading_is_paused_then_dropped(engine: Engine) -> None:
    engine.start("--no-persist", "--client-buffer-kb", "8", "--client-stall-s", "3")
    other = engine.client()
    s = connect(engine)  # this one never reads again
    for i in range(1, 4):
        s.sendall(P.encode(P.Generate(id=i, prompt=COUNTING, max_tokens=3000, logprobs=20)))
    seen_paused = False
    deadline = time.monotonic() + 240
    while True:
        served_promptly(other, 1)  # answered all along: nothing waits on the stuck client
        info = other.status()
        seen_paused = seen_paused or any(j["paused"] for j in info["queue"])
        if info["clients"] == 1:
            break
        assert time.monotonic() < deadline, info
    assert seen_paused and info["queue"] == []
    assert "not reading its replies" in engine.log() and "dropping client raw" in engine.log()
    served_promptly(other, 1)
    s.close()


SUSPENDED = textwrap.dedent("""
    import sys
    from gemma_lsp.engine_client import EngineClient
    c = EngineClient(socket_path=sys.argv[1], autostart=False, name="suspended")
    h = c.generate(sys.argv[2], max_tokens=3000, logprobs=20)
    h.next(300)
    print("streaming", flush=True)
    for _ in h:
        pass
""")


def test_a_suspended_client_process_does_not_block_the_others(engine: Engine) -> None:
    engine.start("--no-persist", "--client-buffer-kb", "8", "--client-stall-s", "3")
    other = engine.client()
    proc = subprocess.Popen([sys.executable, "-c", SUSPENDED, str(engine.sock), COUNTING],
                            env=engine.env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "streaming\n"
        proc.send_signal(signal.SIGSTOP)  # Ctrl-Z in the middle of a long generation
        deadline = time.monotonic() + 240
        while other.status()["clients"] > 1:
            served_promptly(other, 1)
            assert time.monotonic() < deadline
        assert "dropping client suspended" in engine.log()
        served_promptly(other, 2)
    finally:
        proc.kill()
        proc.wait(30)
