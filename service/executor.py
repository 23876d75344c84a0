"""The executor: a child process of each worker that loads the models once and runs jobs.

Why a process of its own: a job that runs past `worker.job_timeout_s`, or whose lease the
worker lost (an operator cancelled it, another worker took it over), must really stop, and
Python cannot stop a thread. The worker kills the executor and starts a fresh one (the models
load again, a few seconds). A crash inside native code (ITK, ANTs, CUDA) kills the executor,
not the worker: the job fails that attempt and the worker goes on.

The executor ignores SIGINT and SIGTERM (the worker decides when a job stops) and exits as
soon as its worker is gone, even if the worker was SIGKILLed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .job_execution import ExecResult, ExecutorSettings, PipelineRequest, ReportRequest

__all__ = [
    "ExecutionFailedError",
    "ExecutorCrashedError",
    "JobAbortedError",
    "JobTimeoutError",
    "SubprocessExecutor",
]

LOG = logging.getLogger(__name__)

_READY = "ready"
_START_TIMEOUT_S = 300.0  # importing torch and loading three models on a slow disk


class ExecutionFailedError(Exception):
    """The job raised; `permanent` says whether running it again unchanged could help."""

    def __init__(self, message: str, *, permanent: bool, details: str = "") -> None:
        super().__init__(message)
        self.permanent = permanent
        self.details = details


class ExecutorCrashedError(Exception):
    """The executor process died while running a job (native crash, out of memory)."""


class JobTimeoutError(Exception):
    """The job ran longer than allowed and was stopped."""


class JobAbortedError(Exception):
    """The worker asked the job to stop (lease lost, shutting down) and it was stopped."""


# -- child side ------------------------------------------------------------------------------


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)  # the worker is gone (even SIGKILL): nobody will take our result
        time.sleep(0.5)


def _child_main(conn: Connection, settings: ExecutorSettings, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()

    from lesionwatch.models.device import configure_cpu_threads, select_device
    from lesionwatch.pipelines.model_cache import ModelCache
    from lesionwatch.pipelines.registry import PIPELINES

    from .job_execution import execute_pipeline, execute_report, is_permanent
    from .logging_setup import configure_logging

    configure_logging(settings.log_level)
    configure_cpu_threads(settings.inference.cpu_threads)
    try:
        models = ModelCache(settings.pipelines, select_device(settings.inference.device))
        for name in settings.pipelines.enabled():
            if name in PIPELINES:
                models.get(PIPELINES[name])  # load once, now, not in the first job
    except Exception as exc:
        conn.send(("failed", str(exc), traceback.format_exc()))
        return
    conn.send((_READY, str(models.device), ""))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if isinstance(request, PipelineRequest):
                result: Any = execute_pipeline(request, models, settings)
            elif isinstance(request, ReportRequest):
                result = execute_report(request, settings)
            else:
                raise TypeError(f"unknown request {type(request).__name__}")
            reply: tuple[Any, ...] = ("ok", result)
        except Exception as exc:
            reply = (
                "error",
                f"{type(exc).__name__}: {exc}",
                is_permanent(exc),
                traceback.format_exc(),
            )
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


# -- worker side -----------------------------------------------------------------------------


class SubprocessExecutor:
    """Runs jobs in a long-lived child process; restarts it after a kill or a crash."""

    def __init__(self, settings: ExecutorSettings, *, name: str = "executor") -> None:
        self._settings = settings
        self._name = name
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.device = ""

    def start(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self.stop()
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(child, self._settings, os.getpid()),
            name=self._name,
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(_START_TIMEOUT_S):
            process.kill()
            raise ExecutorCrashedError(f"{self._name} did not start within {_START_TIMEOUT_S} s")
        try:
            status, detail, details = parent.recv()
        except EOFError as exc:
            raise ExecutorCrashedError(
                f"{self._name} exited while starting (exit code {process.exitcode})"
            ) from exc
        if status != _READY:
            process.join(5)
            raise ExecutionFailedError(
                f"{self._name} could not load the models: {detail}",
                permanent=True,
                details=details,
            )
        self._process, self._conn, self.device = process, parent, detail
        LOG.info("%s ready (pid %d, device %s)", self._name, process.pid, detail)

    def stop(self) -> None:
        """Kill the child (a running job is lost; the caller decides what that means)."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(10)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    def run(
        self,
        request: PipelineRequest | ReportRequest,
        *,
        timeout_s: float,
        should_stop: Callable[[], str | None] = lambda: None,
    ) -> ExecResult:
        """Run `request`; raise on failure, on timeout, on a crash, or when `should_stop()`
        gives a reason to stop."""
        self.start()
        assert self._conn is not None and self._process is not None
        self._conn.send(request)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._conn.poll(0.25):
                try:
                    reply = self._conn.recv()
                except (EOFError, OSError) as exc:
                    code = self._process.exitcode
                    self.stop()
                    raise ExecutorCrashedError(
                        f"the executor process died during the job (exit code {code})"
                    ) from exc
                if reply[0] == "ok":
                    return reply[1]  # type: ignore[no-any-return]
                _, message, permanent, details = reply
                raise ExecutionFailedError(message, permanent=permanent, details=details)
            if not self._process.is_alive():
                code = self._process.exitcode
                self.stop()
                raise ExecutorCrashedError(
                    f"the executor process died during the job (exit code {code})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise JobTimeoutError(f"stopped after the job timeout of {timeout_s:g} s")
            reason = should_stop()
            if reason:
                self.stop()
                raise JobAbortedError(reason)
