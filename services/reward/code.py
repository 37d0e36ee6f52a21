"""Code correctness: run the response's code against the item's tests in the sandbox service.

    score = (# tests passed) / (# tests)

`item.metadata["tests"]` is a JSON list; each test is one of
    "assert f(2) == 4"                       Python run after `from solution import *` (the
                                             solution is solution.py); passes if it exits 0
    {"code": "assert f(2) == 4"}             the same
    {"input": "1 2\\n", "output": "3\\n"}     stdin -> stdout, compared line by line, trailing
                                             whitespace ignored
The solution is the last ```python (or plain ```) block of the response, else the whole response.
Each test is its own sandbox run (so one hanging test does not sink the others), run
concurrently up to `max_concurrency`. Caveat: an assert test runs in the same process as the
solution, so a solution that calls os._exit(0) at import passes it; stdin/stdout tests do not
have that hole. A busy sandbox (RESOURCE_EXHAUSTED) is retried until the item's deadline.

The sandbox is called with the reward config's `client` settings (token, CA, client certificate).
A refusal no retry can fix (UNAUTHENTICATED, PERMISSION_DENIED, a failed TLS handshake, ...)
raises SandboxRefused: the item fails (score 0, reason "ERROR: SandboxRefused: ...", naming the
status code and the config key to check), so a misconfigured stack shows up as errors, not as
a policy that writes wrong code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import grpc

from forgerpc.clients import ChannelSettings, ForgeRPCError, SandboxClient
from forgerpc.services.reward.functions import Score
from forgerpc.v1 import sandbox_pb2

log = logging.getLogger("forgerpc.reward")

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(response: str) -> str:
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def _parse_tests(raw: str) -> list[dict]:
    tests = json.loads(raw)
    if not isinstance(tests, list) or not tests:
        raise ValueError("must be a non-empty JSON list")
    out = []
    for i, t in enumerate(tests):
        if isinstance(t, str):
            t = {"code": t}
        if not isinstance(t, dict) or not ({"code"} <= t.keys() or {"input", "output"} <= t.keys()):
            raise ValueError(f"test {i} must be a string, {{code}} or {{input, output}}")
        out.append(t)
    return out


def _same_output(got: bytes, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got.decode(errors="replace")) == norm(want)


class SandboxRefused(RuntimeError):
    """The sandbox refused or failed the call for a reason that is not the solution's."""

    # The reward's `client` keys to check; the item's reason is cut at 200 characters, so the
    # code and the hint come first and the server's own message last.
    _HINTS = {
        grpc.StatusCode.UNAUTHENTICATED: "check the reward's client.token_env",
        grpc.StatusCode.PERMISSION_DENIED: "check the reward's client.token_env",
        grpc.StatusCode.UNAVAILABLE: "down, or TLS refused: check the reward's client.tls_*",
    }

    def __init__(self, address: str, error: ForgeRPCError):
        hint = self._HINTS.get(error.code, "see the sandbox's log")
        super().__init__(f"sandbox {address}: {error.code.name}, {hint} ({error.message})")
        self.code = error.code


class CodeTests:
    """Reward function object; `await CodeTests(addr)(item)` -> (score, reason).

    `settings`: how to reach the sandbox (token, TLS): the reward config's `client` section.
    """

    def __init__(self, sandbox_address: str, timeout_seconds: float = 5.0, memory_bytes: int = 0,
                 max_concurrency: int = 8, *, settings: ChannelSettings = ChannelSettings()):
        if not sandbox_address:
            raise ValueError("code_tests needs the reward config's sandbox_address")
        self.address = sandbox_address
        self.settings = settings
        self.timeout = timeout_seconds
        self.memory_bytes = memory_bytes
        self.max_concurrency = max_concurrency
        self._client: SandboxClient | None = None
        self._gate: asyncio.Semaphore | None = None
        self._logged: set[grpc.StatusCode] = set()

    def _lazy(self) -> SandboxClient:
        # grpc.aio channels belong to the loop that made them: create on first use, in the loop.
        if self._client is None:
            self._client = SandboxClient(self.address, settings=self.settings, timeout=self.timeout + 30)
            self._gate = asyncio.Semaphore(self.max_concurrency)
        return self._client

    async def _run(self, solution: str, test: dict) -> int:
        client = self._lazy()
        code, stdin, files = solution, b"", []
        if "code" in test:
            # The solution as a module, so its `if __name__ == "__main__":` part does not run.
            code = f"from solution import *\n{test['code']}\n"
            files = [sandbox_pb2.SandboxFile(path="solution.py", content=solution.encode())]
        else:
            stdin = str(test["input"]).encode()
        delay = 0.05
        async with self._gate:
            while True:
                try:
                    out = await client.execute(code=code, stdin=stdin, files=files,
                                               timeout_seconds=self.timeout,
                                               memory_bytes=self.memory_bytes)
                    break
                except ForgeRPCError as e:
                    if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise self._refused(e) from None
                    await asyncio.sleep(delay)  # the item's deadline cancels this loop
                    delay = min(delay * 2, 1.0)
        if out.verdict == sandbox_pb2.VERDICT_OK and ("code" in test or _same_output(out.stdout, test["output"])):
            return -1  # passed
        return out.verdict

    async def __call__(self, item) -> Score:
        try:
            tests = _parse_tests(item.metadata.get("tests", ""))
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            return 0.0, f"code_tests: malformed metadata['tests']: {e}"[:200]
        solution = extract_code(item.response)
        if not solution.strip():
            return 0.0, "code_tests: no code in response"
        results = await asyncio.gather(*(self._run(solution, t) for t in tests))
        passed = sum(r == -1 for r in results)
        failed = {}
        for r in results:
            if r != -1:
                name = "WRONG_ANSWER" if r == sandbox_pb2.VERDICT_OK else sandbox_pb2.Verdict.Name(r).removeprefix("VERDICT_")
                failed[name] = failed.get(name, 0) + 1
        detail = ", ".join(f"{n} {k}" for k, n in sorted(failed.items()))
        reason = f"code_tests: {passed}/{len(tests)} passed" + (f" ({detail})" if detail else "")
        if passed == 0 and set(failed) == {"TIMEOUT"}:
            reason = "TIMEOUT: " + reason
        return passed / len(tests), reason

    def _refused(self, error: ForgeRPCError) -> SandboxRefused:
        refused = SandboxRefused(self.address, error)
        # Once per status code: a missing token would otherwise log every test of every item.
        if error.code not in self._logged:
            self._logged.add(error.code)
            log.error("code_tests: %s", refused)
        return refused

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
