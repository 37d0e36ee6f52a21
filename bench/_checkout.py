"""Makes `import forgerpc` work from a plain checkout (the device machine has no install).

The GPU scripts run as `python bench/<script>.py` on a machine that only has the working tree:
when forgerpc is not installed, a temporary package folder maps its subpackages onto the
checkout's folders, the same mapping pyproject.toml's package-dir declares.
"""

import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ensure_importable() -> None:
    try:
        import forgerpc.services  # noqa: F401
        return
    except ImportError:
        pass
    shim = pathlib.Path(tempfile.mkdtemp()) / "forgerpc"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    for name, target in {"v1": "protos/forgerpc/v1", "services": "services", "clients": "clients"}.items():
        (shim / name).symlink_to(ROOT / target)
    sys.path.insert(0, str(shim.parent))
