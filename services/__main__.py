"""`python -m forgerpc.services serve <name> [--host H] [--port P] [--config FILE] [key=value ...]`.

This is what `forgerpc serve` and the local stack launcher run, one OS process per service.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from forgerpc.clients.config import ConfigError, load_config
from forgerpc.services import registry
from forgerpc.services.common.runtime import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgerpc serve", description="Run one forgerpc service.")
    p = parser
    p.add_argument("command", choices=["serve"])
    p.add_argument("service", choices=sorted(registry.MODULES), help="which service")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--port", type=int, help="listen port; 0 picks a free one (overrides server.port)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. server.port=50051")
    args = parser.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    definition = registry.load(args.service)
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"server.host={args.host}")
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    try:
        config = load_config(definition.config_model, args.config, overrides)
        asyncio.run(serve(definition, config))
    except ConfigError as e:
        print(f"forgerpc serve {args.service}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"forgerpc serve {args.service}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
