"""SandboxService behaviour: stdin, files, metrics, validation at the edge, the bounded pool."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from forgerpc.clients import ForgeRPCError, SandboxClient
from forgerpc.v1 import sandbox_pb2 as pb


@pytest.fixture
def sandbox(serve_process, tmp_path):
    return serve_process("sandbox", "workers=1", "max_queue=1", "uid_base=63000",
                         f"work_root={tmp_path}")


async def test_stdin_files_and_metrics(sandbox):
    code = (
        "import sys, json\n"
        "data = json.load(open('data/in.json'))\n"
        "print(sum(data) + int(sys.stdin.read()))\n"
        "x = bytearray(100 * 1024 * 1024)\n"
        "for _ in range(3 * 10**6): pass\n"
    )
    async with SandboxClient(sandbox.address) as client:
        out = await client.execute(code=code, stdin=b"100",
                                   files=[pb.SandboxFile(path="data/in.json", content=b"[1, 2, 3]")])
        assert out.verdict == pb.VERDICT_OK, out.stderr
        assert out.stdout == b"106\n" and out.exit_code == 0
        assert out.peak_memory_bytes >= 100 * 1024 * 1024  # the bytearray is touched (zeroed)
        assert out.peak_memory_bytes < 400 * 1024 * 1024
        assert 0.02 < out.cpu_seconds and out.wall_seconds >= out.cpu_seconds * 0.5

        err = await client.execute(code="import sys; print('x', file=sys.stderr); sys.exit(3)")
        assert (err.verdict, err.exit_code, err.stderr) == (pb.VERDICT_RUNTIME_ERROR, 3, b"x\n")


INVALID = [
    ({"code": ""}, "code"),
    ({"code": "1", "files": [pb.SandboxFile(path="../x")]}, "files[0].path"),
    ({"code": "1", "files": [pb.SandboxFile(path="/etc/x")]}, "files[0].path"),
    ({"code": "1", "files": [pb.SandboxFile(path="main.py")]}, "files[0].path"),
    ({"code": "1", "timeout_seconds": 1e9}, "timeout_seconds"),
    ({"code": "1", "memory_bytes": 1 << 50}, "memory_bytes"),
    ({"code": "1", "language": 7}, "language"),
]


async def test_invalid_requests_name_the_field(sandbox):
    async with SandboxClient(sandbox.address) as client:
        for fields, field in INVALID:
            with pytest.raises(ForgeRPCError) as err:
                await client.execute(**fields)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details["field"] == field


async def test_pool_is_bounded(sandbox):
    # One worker, one queue place: of three concurrent 1 s runs, one is refused at once.
    async with SandboxClient(sandbox.address) as client:
        calls = [client.execute(code="import time; time.sleep(1)", timeout_seconds=5) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, ForgeRPCError)]
    assert len(refused) == 1
    assert refused[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused[0].reason == "SANDBOX_BUSY"
    assert sorted(r.verdict for r in results if not isinstance(r, Exception)) == [pb.VERDICT_OK] * 2


async def test_cancelled_call_keeps_its_slot_until_the_run_ends(sandbox):
    # The caller gives up after 0.3 s, but its program runs on (up to 1.5 s). The next run must
    # wait for that slot rather than share its uid (the cleanup sweep would kill the other run).
    async with SandboxClient(sandbox.address) as client:
        with pytest.raises(ForgeRPCError) as err:
            await client.execute(code="import time; time.sleep(1.5)", timeout_seconds=3, timeout=0.3)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        start = asyncio.get_running_loop().time()
        out = await client.execute(code="print('next')")
        waited = asyncio.get_running_loop().time() - start
    assert out.verdict == pb.VERDICT_OK and out.stdout == b"next\n"
    assert waited >= 0.9  # it queued behind the abandoned run


async def test_shared_work_root_survives_the_server(serve_process, tmp_path):
    """work_root may be shared (e.g. /tmp): the server works in, and deletes, only its own
    forgerpc-sandbox-<pid> directory there, and never narrows the parent's permissions."""
    import os
    import stat

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    os.chmod(shared, 0o1777)  # like /tmp (mkdir's mode is masked by the umask)
    (shared / "someone-elses-file").write_text("keep me")
    proc = serve_process("sandbox", "workers=1", "uid_base=63100", f"work_root={shared}")
    async with SandboxClient(proc.address) as client:
        assert (await client.execute(code="print(1)")).stdout == b"1\n"
    assert [p.name for p in shared.glob("forgerpc-sandbox-*")] == [f"forgerpc-sandbox-{proc.proc.pid}"]
    proc.terminate()
    assert (shared / "someone-elses-file").read_text() == "keep me"
    assert list(shared.glob("forgerpc-sandbox-*")) == [], "the server's own directory is removed"
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
