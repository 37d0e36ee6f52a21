"""Service-to-service auth as deployed: reward -> sandbox over mTLS with the stack's token.

Everything is the compose TLS stack's own (deploy/compose.yaml + compose.tls.yaml, rendered by
the Compose v2 binary): the `certs` job's command makes the certificates, the sandbox serves
token + mTLS, and the reward service calls it with its config's `client:` section (the token
and its own certificate, from FORGERPC_TOKEN / FORGERPC_CLIENT_TLS_*). Each is a real process.
Local substitutions, as in test_deploy_processes: ports 127.0.0.1:0, /certs -> a temp folder,
`sandbox:50051` -> the sandbox's local address, and a code_tests reward function (the deploy
config scores exact matches only).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from test_deploy_compose import FORGERPC, render
from test_deploy_processes import Container

from forgerpc.clients import ChannelSettings, RewardClient
from forgerpc.clients.retry import NO_RETRY
from forgerpc.v1.reward_pb2 import RewardItem

TESTS = json.dumps(["assert add(1, 2) == 3", {"input": "2 3\n", "output": "5\n"}])
MAIN = "if __name__ == '__main__':\n    a, b = map(int, input().split())\n    print(add(a, b))\n"
CORRECT = "```python\ndef add(a, b):\n    return a + b\n" + MAIN + "```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n" + MAIN + "```"


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    """(compose doc, certs dir, running sandbox, start_reward(*overrides) -> Container)."""
    tmp = tmp_path_factory.mktemp("tls")
    doc = render("cpu", tls=True)
    job = [a.replace("/var/lib/forgerpc/ca", str(tmp / "ca")).replace("/certs", str(tmp))
           for a in doc["services"]["certs"]["command"]]
    made = subprocess.run([*FORGERPC, *job], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    started = [Container(doc, "sandbox", certs_dir=tmp, extra=("uid_base=66000",))]

    def start_reward(*overrides: str) -> Container:
        functions = "functions=[{kind: code_tests, options: {timeout_seconds: 5}}]"
        started.append(Container(doc, "reward", certs_dir=tmp,
                                 extra=(f"sandbox_address={started[0].address}", functions, *overrides)))
        return started[-1]

    try:
        yield doc, tmp, started[0], start_reward
    finally:
        for c in started:
            c.stop()


def _client(reward: Container, certs) -> RewardClient:
    """The orchestrator's side: token + the client certificate (the reward serves mTLS too)."""
    settings = ChannelSettings(token_env="FORGERPC_TOKEN", tls_ca=str(certs / "ca.pem"),
                               tls_cert=str(certs / "client.pem"), tls_key=str(certs / "client.key"))
    return RewardClient(reward.address, settings=settings, retry=NO_RETRY, timeout=30)


async def _scores(reward: Container, certs, monkeypatch) -> list:
    monkeypatch.setenv("FORGERPC_TOKEN", reward.env["FORGERPC_TOKEN"])
    async with _client(reward, certs) as client:
        out = await client.evaluate(items=[RewardItem(response=r, metadata={"tests": TESTS}) for r in (CORRECT, WRONG)],
                                    item_timeout_seconds=20)
    return list(out.scores)


async def test_reward_scores_code_in_a_token_mtls_sandbox(tls_stack, monkeypatch):
    doc, certs, sandbox, start_reward = tls_stack
    # The wiring under test: the reward's own certificate and CA for its outgoing calls.
    env = doc["services"]["reward"]["environment"]
    assert env["FORGERPC_CLIENT_TLS_CERT"] == "/certs/reward.pem" and env["FORGERPC_CLIENT_TLS_CA"] == "/certs/ca.pem"
    assert sandbox.healthcheck().returncode == 0
    reward = start_reward()
    correct, wrong = await _scores(reward, certs, monkeypatch)
    assert correct.score == 1.0 and correct.reason == "code_tests: 2/2 passed", correct.reason
    # Both tests ran in the sandbox and failed on their merits: the assert raises, "2 3" prints -1.
    assert wrong.score == 0.0 and wrong.reason == "code_tests: 0/2 passed (1 RUNTIME_ERROR, 1 WRONG_ANSWER)", wrong.reason


@pytest.mark.parametrize("overrides, code, hint", [
    (("client.token_env=",), "UNAUTHENTICATED", "client.token_env"),
    (("client.tls_cert=", "client.tls_key="), "UNAVAILABLE", "client.tls_*"),  # mTLS: no client cert
], ids=["no-token", "no-client-cert"])
async def test_a_refused_sandbox_call_is_a_clear_reward_error(tls_stack, monkeypatch, overrides, code, hint):
    """The item fails (score 0, reason ERROR: ...) naming the status and the config key to fix,
    rather than scoring 0 as a wrong solution would; the service logs it once, no traceback."""
    _, certs, _, start_reward = tls_stack
    reward = start_reward(*overrides)
    scores = await _scores(reward, certs, monkeypatch)
    for s in scores:
        assert s.score == 0.0 and s.reason.startswith("ERROR: SandboxRefused"), s.reason
        assert code in s.reason and hint in s.reason, s.reason
    reward.stop()
    log = reward.proc.stderr.read()
    assert "Traceback" not in log, log[-3000:]
    assert log.count(f": {code}, check") + log.count(f": {code}, down") == 1, log[-3000:]
