"""The `forgerpc` command.

    forgerpc serve <service> [--host H] [--port P] [--config FILE] [key=value ...]
    forgerpc up CONFIG [key=value ...]        # start the stack, report health, wait for Ctrl-C
    forgerpc run CONFIG [key=value ...]       # start the stack and run the main job
    forgerpc run CONFIG --resume RUN_DIR      # continue that run from its newest checkpoint
    forgerpc health ADDRESS [--service NAME]  # exit 0 when SERVING (container health checks)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from forgerpc.clients.config import ConfigError, load_config

SERVICES = ("generator", "reward", "replay_buffer", "trainer", "weight_store", "sandbox", "environment")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forgerpc", description="RL post-training as gRPC microservices.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service in this process")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("rest", nargs=argparse.REMAINDER, help="--host, --port, --config, key=value overrides")

    for name, text in (("up", "start the stack and wait for Ctrl-C"), ("run", "start the stack and run the main job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="stack/run YAML, e.g. configs/stack_local.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "up":
            p.add_argument("--once", action="store_true", help="report health and stop instead of waiting")
        else:
            p.add_argument("--resume", metavar="RUN_DIR", default="",
                           help="continue the run in RUN_DIR from its newest checkpoint (run_dir is set to it)")

    health = sub.add_parser("health", help="check a service's gRPC health; exit 0 if SERVING")
    health.add_argument("address", help="host:port")
    health.add_argument("--service", default="", help="service name to check (default: the server)")
    health.add_argument("--timeout", type=float, default=2.0)

    from forgerpc.orchestrator import certs

    certs.add_parser(sub)  # forgerpc certs DIR: development CA and TLS certificates
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may also follow an option (`run CONFIG --resume DIR steps=5`)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("up", "run") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command == "serve":
        # A service runs as its own program (the orchestrator never imports services).
        os.execv(sys.executable, [sys.executable, "-m", "forgerpc.services", "serve", args.service, *args.rest])
    if args.command == "health":
        return asyncio.run(_health(args.address, args.service, args.timeout))
    if args.command == "certs":
        from forgerpc.orchestrator import certs

        return certs.main(args)
    from forgerpc.orchestrator.config import RunConfig

    overrides = list(args.overrides)
    if getattr(args, "resume", ""):
        overrides.append(f"run_dir={args.resume}")
    try:
        cfg = load_config(RunConfig, args.config, overrides)
    except ConfigError as e:
        print(f"forgerpc {args.command}: {e}", file=sys.stderr)
        return 2
    try:  # FORGERPC_TRACES / FORGERPC_METRICS, read by every process of the stack
        from forgerpc.clients.telemetry import exporter_names

        exporter_names("traces"), exporter_names("metrics")
    except ValueError as e:
        print(f"forgerpc {args.command}: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            from forgerpc.orchestrator.run import run

            # SIGTERM (docker stop, kill) ends the run like Ctrl-C: every service process is stopped.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            result = asyncio.run(run(cfg, resume=bool(args.resume)))
            return 0 if result.get("healthy") else 1
        return asyncio.run(_up(cfg, wait=not args.once))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError) as e:
        print(f"forgerpc {args.command}: {e}", file=sys.stderr)
        return 1


async def _health(address: str, service: str, timeout: float) -> int:
    from forgerpc.clients import ForgeRPCError, RewardClient

    # Any typed client can ask grpc.health.v1; the class only fixes which service it is.
    async with RewardClient(address) as client:
        try:
            status = await client.health(service, timeout=timeout)
        except ForgeRPCError as e:
            status = f"{e.code.name}: {e.message}"
    print(f"{address} {service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


async def _up(cfg, wait: bool) -> int:
    from rich.console import Console

    from forgerpc.orchestrator.run import health_table, start_stack

    console = Console()
    async with start_stack(cfg, log_dir=None) as stack:
        report = await stack.health()
        console.print(health_table(report))
        console.print(f"logs: {stack.log_dir}")
        if wait:
            console.print("stack is up; Ctrl-C stops it")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    return 0 if all(s == "SERVING" for rows in report.values() for _, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
