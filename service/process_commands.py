"""`lesionwatch serve | listen | work | dispatch`: the long-running processes."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from lesionwatch.config import LesionWatchConfig

from .cli_support import CommandError, add_connection_options, load_from_args
from .logging_setup import configure_logging

__all__ = ["add_process_commands", "run_process"]

log = logging.getLogger("lesionwatch")


def run_process(config: LesionWatchConfig, roles: Any) -> int:
    """Start the parts named by `roles`, run until SIGTERM/SIGINT, stop cleanly."""
    from .server import ServiceProcess

    configure_logging(config.log_level)
    process = ServiceProcess(config, roles)
    stopping: list[int] = []

    def _shutdown(signum: int, _frame: object) -> None:
        if stopping:
            return
        stopping.append(signum)
        log.info(
            "received %s: no new work is taken; a running job may finish within %g s",
            signal.Signals(signum).name,
            config.worker.shutdown_grace_s,
        )
        process.request_stop()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    try:
        process.start()
        process.wait()
    finally:
        process.stop()
    log.info("stopped")
    return 0


def _listener_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"listener.port": args.port, "listener.ae_title": args.ae_title}


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import Roles

    overrides = _listener_overrides(args)
    overrides["worker.concurrency"] = args.workers
    config = load_from_args(args, overrides)
    return run_process(config, Roles(listen=True, work=True, dispatch=True))


def _cmd_listen(args: argparse.Namespace) -> int:
    from .server import Roles

    return run_process(load_from_args(args, _listener_overrides(args)), Roles(listen=True))


def _cmd_work(args: argparse.Namespace) -> int:
    from .server import Roles

    config = load_from_args(args)
    queues = tuple(args.queue) if args.queue else None
    return run_process(config, Roles(work=True, queues=queues, concurrency=args.concurrency))


def _cmd_dispatch(args: argparse.Namespace) -> int:
    from .server import Roles

    config = load_from_args(args)
    if not config.destinations:
        raise CommandError(
            "no destinations configured: add a `destinations:` section to the config"
        )
    return run_process(config, Roles(dispatch=True))


def _listener_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, help="listener port (listener.port)")
    parser.add_argument("--ae-title", help="listener AE title (listener.ae_title)")


def add_process_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = commands.add_parser(
        "serve",
        help="Run everything: listener, study assembly, workers and result delivery.",
        description="Run everything in one process: the DICOM listener, study assembly, "
        "workers (one executor process each) and the dispatcher that sends results to the "
        "configured destinations. Embedded SQLite and queue unless configured otherwise.",
    )
    _listener_options(serve)
    serve.add_argument("--workers", type=int, help="worker count (worker.concurrency)")
    add_connection_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    listen = commands.add_parser(
        "listen", help="Run the DICOM listener and study assembly only (large sites)."
    )
    _listener_options(listen)
    add_connection_options(listen)
    listen.set_defaults(handler=_cmd_listen)

    work = commands.add_parser(
        "work", help="Run workers that take jobs from the broker (GPU machines)."
    )
    work.add_argument(
        "--queue",
        action="append",
        help="queue to take jobs from; repeat for several (default: worker.queues)",
    )
    work.add_argument("--concurrency", type=int, help="worker count (worker.concurrency)")
    add_connection_options(work)
    work.set_defaults(handler=_cmd_work)

    dispatch = commands.add_parser(
        "dispatch",
        aliases=["dispatcher"],
        help="Deliver results to the configured destinations, retrying with backoff.",
    )
    add_connection_options(dispatch)
    dispatch.set_defaults(handler=_cmd_dispatch)
