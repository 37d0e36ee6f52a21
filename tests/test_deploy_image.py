"""deploy/Dockerfile, checked without an engine: its structure, what it copies, its pins, and its
HEALTHCHECK / CMD run for real against a service process.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

from forgerpc.orchestrator.cli import _parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list] = {}
    name = None
    for word, rest in instructions():
        if word == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else rest
            out[name] = []
        elif name is not None:
            out[name].append((word, rest))
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_multi_stage_non_root_with_forgerpc_entrypoint():
    s = stages()
    assert list(s) == ["build", "runtime"]
    final = dict((w, r) for w, r in s["runtime"])  # last occurrence of each instruction
    assert final["USER"].split(":")[0] not in ("0", "root")
    assert json.loads(final["ENTRYPOINT"])[-1] == "forgerpc"
    assert ("COPY", "--from=build /opt/venv /opt/venv") in s["runtime"]
    # Nothing compiles or downloads Python packages in the final image.
    assert not any(w == "RUN" and "pip " in r for w, r in s["runtime"])


def test_default_cmd_is_a_real_command():
    cmd = json.loads(dict(stages()["runtime"])["CMD"])
    args = _parser().parse_args(cmd)
    assert args.command == "serve" and args.service == "reward"


def test_variants_install_what_pyproject_declares():
    run = next(r for w, r in stages()["build"] if w == "RUN" and "VARIANT" in r)
    extras = pyproject()["project"]["optional-dependencies"]
    torch_pin = next(d for d in extras["ml"] if d.startswith("torch"))
    assert torch_pin == "torch==2.13.0" and f"pip install {torch_pin} --index-url" in run
    cpu, cuda = (re.search(r'"cpu" \];\s*then(.*?);\s*elif', run)[1],
                 re.search(r'"cuda" \];\s*then(.*?);\s*else', run)[1])
    assert '".[ml]"' in cpu
    assert '".[vllm,titan]"' in cuda and {"vllm", "titan"} <= set(extras)
    assert "exit 1" in run  # an unknown VARIANT fails the build instead of building something else


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for p in patterns:
        negate = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or p == "*":
            result = not negate
    return result


def test_build_context_holds_every_package():
    patterns = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [r.split()[:-1] for w, r in stages()["build"] if w == "COPY" and not r.startswith("--from")]
    sources = {src for srcs in copies for src in srcs}
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not ignored(src, patterns), f"{src} is excluded by Dockerfile.dockerignore"
    # Every folder the package is built from is copied (else the wheel misses a subpackage).
    package_dirs = {d.split("/")[0] for d in pyproject()["tool"]["setuptools"]["package-dir"].values()}
    assert package_dirs <= sources, package_dirs - sources
    assert ignored("certs/ca.key", patterns) and ignored(".venv", patterns)


def test_healthcheck_command_reports_a_real_service(serve_process):
    check = next(r for w, r in stages()["runtime"] if w == "HEALTHCHECK")
    shell = check.split(" CMD ", 1)[1]
    assert shell.startswith("forgerpc health ")
    reward = serve_process("reward")
    port = reward.address.rsplit(":", 1)[1]
    # The console script installed in this venv is what the image's PATH finds.
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    ok = subprocess.run(["sh", "-c", shell], env={**env, "FORGERPC_PORT": port},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    reward.terminate()
    down = subprocess.run(["sh", "-c", shell], env={**env, "FORGERPC_PORT": port},
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
