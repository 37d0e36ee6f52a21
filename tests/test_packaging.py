"""One import namespace, `forgerpc.*`, for editable installs and built wheels alike."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

from conftest import ROOT


def _declared_packages() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared():
    roots = {"services": "forgerpc.services", "clients": "forgerpc.clients", "orchestrator": "forgerpc.orchestrator",
             "protos/forgerpc": "forgerpc"}
    found = set()
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    missing = found - _declared_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_editable_install_imports_only_forgerpc_namespace():
    code = (
        "import importlib.util as u, forgerpc.clients, forgerpc.services.reward.server, forgerpc.orchestrator.cli, "
        "forgerpc.v1.reward_pb2\n"
        "assert all(u.find_spec(n) is None for n in ('services', 'clients', 'orchestrator', 'v1')), 'stray top-level'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_sdk_imports_without_torch():
    code = "import sys, forgerpc.clients; assert 'torch' not in sys.modules, 'the SDK imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.slow
def test_built_wheel_installs_and_runs(tmp_path):
    """Build a wheel, install it (without deps) into a fresh venv that borrows this venv's
    dependencies via a .pth line, and run `forgerpc --help` from outside the repo."""
    # Built from a copy of the tracked files: building in ROOT writes build/ and *.egg-info there,
    # which `make test` would race with .venv-vllm's editable install running beside this suite.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("forgerpc-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    # Dependencies come from this venv; the editable finder's .pth is not processed from there,
    # so `forgerpc` can only be found in the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    top = {p.name for p in site.iterdir()}
    assert "forgerpc" in top and not top & {"services", "clients", "orchestrator", "protos"}, sorted(top)
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import forgerpc, forgerpc.services.reward.server, forgerpc.v1.common_pb2;"
                          "print(forgerpc.__file__)"], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert str(site) in out.stdout, f"imported the wrong forgerpc: {out.stdout}"
    assert (site / "forgerpc" / "v1" / "common.proto").is_file(), "protos ship in the wheel"
    helped = subprocess.run([str(python), "-m", "forgerpc.orchestrator", "--help"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    # The console script, as a user would run it.
    script = site / "bin" / "forgerpc"
    if script.exists():
        ran = subprocess.run([str(python), str(script), "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
