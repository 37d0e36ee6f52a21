"""Per-service `cpus` in the stack config: every thread of a pinned service stays on its cores."""

import os
import pathlib

import pytest

from forgerpc.clients.config import ConfigError, load_config
from forgerpc.orchestrator.config import StackConfig
from forgerpc.orchestrator.launcher import Stack


async def test_a_pinned_service_runs_every_thread_on_its_cores_and_others_are_not_pinned(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1]
    cfg = load_config(StackConfig, None, [f"services.reward.cpus=[{core}]", "services.replay_buffer.config={}"])
    async with Stack(cfg, log_dir=tmp_path) as stack:
        by_name = {p.name: p.process.pid for p in stack.processes}
        # the service answered health checks, so its gRPC and executor threads exist by now
        tasks = [int(t) for t in os.listdir(f"/proc/{by_name['reward']}/task")]
        assert len(tasks) > 1
        assert {t: os.sched_getaffinity(t) for t in tasks} == {t: {core} for t in tasks}
        assert os.sched_getaffinity(by_name["replay_buffer"]) == set(allowed)
        assert "taskset" not in pathlib.Path(f"/proc/{by_name['reward']}/cmdline").read_text()  # exec'd, same pid


def test_cpus_must_be_core_numbers():
    with pytest.raises(ConfigError, match="cpus"):
        load_config(StackConfig, None, ["services.reward.cpus=[-1]"])
