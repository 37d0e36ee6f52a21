"""A user's own reward function, referenced by import path in the config:

    functions:
      - {kind: python, options: {path: "mypkg.rewards:score", scale: 2}}

Stated signature (sync or async; options other than `path` are passed as keywords):

    def score(prompt: str, response: str, target: str, metadata: dict[str, str], **options)
        -> float | tuple[float, str]

The return value is the sub-score (a finite float) and optionally a reason. It is checked when
the server starts (importable, callable, accepts those arguments) so a typo fails at start-up.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

from forgerpc.services.reward.functions import Score


def load(path: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"path must look like 'pkg.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"{path!r} is not a callable")
    return fn


class UserFunction:
    """Adapts a user's function to the server's `fn(item) -> (score, reason)` convention."""

    def __init__(self, path: str, **options: Any):
        self.fn = load(path)
        self.options = options
        self.name = path
        try:
            inspect.signature(self.fn).bind("", "", "", {}, **options)
        except TypeError as e:
            raise ValueError(f"{path} does not accept (prompt, response, target, metadata, "
                             f"**{sorted(options)}): {e}") from None
        self.is_async = inspect.iscoroutinefunction(self.fn)

    def _result(self, value: Any) -> Score:
        reason = f"{self.name}: ok"
        if isinstance(value, tuple):
            value, reason = value
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.name} returned {value}")
        return value, str(reason)

    def _args(self, item) -> tuple:
        return item.prompt, item.response, item.target, dict(item.metadata)

    def __call__(self, item) -> Score:
        return self._result(self.fn(*self._args(item), **self.options))

    async def call_async(self, item) -> Score:
        return self._result(await self.fn(*self._args(item), **self.options))
