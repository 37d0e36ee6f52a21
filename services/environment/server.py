"""The EnvironmentService servicer: sessions over the environments of envs.py.

A session is one episode: Reset draws a task from the environment with `seed` (the same seed and
options give the same task) and returns its id; Step applies an action; Close frees it. Sessions
live in this process only (an episode is seconds long; a restarted server answers NOT_FOUND and
the rollout starts a new one). They are kept in least-recently-used order, so expiry pops from
the front: O(expired) per call, whatever the number of open sessions.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
import uuid

from forgerpc.services.common.errors import (
    failed_precondition,
    invalid_argument,
    not_found,
    require,
    resource_exhausted,
)
from forgerpc.services.common.runtime import ServiceDefinition
from forgerpc.services.environment.config import EnvironmentConfig
from forgerpc.services.environment.envs import ENVIRONMENTS, OptionError
from forgerpc.v1 import environment_pb2, environment_pb2_grpc


@dataclasses.dataclass
class Session:
    env: object
    state: dict
    touched: float
    done: bool = False


class EnvironmentServicer(environment_pb2_grpc.EnvironmentServiceServicer):
    def __init__(self, cfg: EnvironmentConfig):
        self.cfg = cfg
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def _expire(self, now: float) -> None:
        while self.sessions:
            sid, session = next(iter(self.sessions.items()))
            if now - session.touched < self.cfg.session_ttl_seconds:
                return
            del self.sessions[sid]

    def _session(self, sid: str) -> Session:
        require(bool(sid), "session_id", "must not be empty")
        now = time.monotonic()
        self._expire(now)
        session = self.sessions.get(sid)
        if session is None:
            raise not_found("session", f"no open session '{sid}' (closed, expired after "
                                       f"{self.cfg.session_ttl_seconds:g} s idle, or never opened here)")
        session.touched = now
        self.sessions.move_to_end(sid)
        return session

    async def Reset(self, request, context):
        cls = ENVIRONMENTS.get(request.environment)
        require(cls is not None, "environment",
                f"unknown environment {request.environment!r} (known: {', '.join(sorted(ENVIRONMENTS))})")
        now = time.monotonic()
        self._expire(now)
        if len(self.sessions) >= self.cfg.max_sessions:
            raise resource_exhausted("SESSIONS_EXHAUSTED",
                                     f"{len(self.sessions)} sessions are open (max_sessions); Close finished ones",
                                     max_sessions=self.cfg.max_sessions)
        env = cls()
        try:
            state, observations = env.reset(random.Random(request.seed), dict(request.options))
        except OptionError as e:
            raise invalid_argument(f"options.{e.key}", str(e)) from None
        sid = uuid.uuid4().hex
        self.sessions[sid] = Session(env, state, now)
        return environment_pb2.ResetResponse(session_id=sid, observations=observations)

    async def Step(self, request, context):
        require(request.HasField("action"), "action", "is required")
        require(request.action.role in ("", "assistant"), "action.role",
                f"must be 'assistant' (the agent's turn), got {request.action.role!r}")
        require(len(request.action.content) <= self.cfg.max_action_chars, "action.content",
                f"longer than max_action_chars ({self.cfg.max_action_chars})")
        session = self._session(request.session_id)
        if session.done:
            raise failed_precondition("EPISODE_DONE", f"session '{request.session_id}' has ended; Reset starts a new one")
        outcome = session.env.step(session.state, request.action.content)
        session.done = outcome.done
        return environment_pb2.StepResponse(observations=outcome.observations, reward=outcome.reward,
                                            done=outcome.done, info=outcome.info)

    async def Close(self, request, context):
        require(bool(request.session_id), "session_id", "must not be empty")
        return environment_pb2.CloseResponse(closed=self.sessions.pop(request.session_id, None) is not None)


async def create(cfg: EnvironmentConfig):
    return [EnvironmentServicer(cfg)]


SERVICE = ServiceDefinition(name="environment", config_model=EnvironmentConfig, create=create)
