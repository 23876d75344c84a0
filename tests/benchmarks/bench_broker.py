"""Broker overhead and worker scaling: LesionWatch's queues against Celery, in one run.

Part 1, overhead per job of a trivial job (the executor returns at once), for the embedded
queue on SQLite, the embedded queue on PostgreSQL and RabbitMQ (job rows on PostgreSQL):

- "job path": LesionWatch's real path. The producer commits a job row and its outbox row in
  one transaction (as the assembler does), the outbox relay publishes it, a real `Worker`
  (one thread, production broker settings) receives it, claims the job (transaction), reads
  its inputs (transaction), records itself busy (transaction), runs the executor, completes
  the job (one transaction: SUCCEEDED, audit, report check) and acks. Each study keeps a
  second, pending pipeline job that never runs, so completing the FLAIR job does not queue a
  study report: one benchmark job is exactly one message.
- "raw broker": the `Broker` object alone, no job rows: publish, a consumer thread receives
  and acks.
- Celery on the same RabbitMQ (peer): a no-op task, `task_acks_late=True`,
  `worker_prefetch_multiplier=1`, solo pool, `send_task` waits for RabbitMQ's publisher
  confirm (as LesionWatch's publish does), result back through the rpc:// backend; the worker
  is a subprocess. No database: compare it with the "raw broker" rows as well.

Sequential latency: publish one job to an idle worker, wait until it is acked (LesionWatch:
the moment `ack` returns in the worker; Celery: the moment the client holds the result, which
the worker publishes just before its late ack), N times; mean, p50 and p95. Drain
throughput: N jobs published at once (LesionWatch: one producer transaction for N job rows,
then one relay pass) into an idle, waiting worker; jobs/s = N / (last ack - start of
publishing). Each series follows 10 unmeasured warm-up jobs.

Part 2, scaling: jobs/s with 1 and 2 worker processes (multiprocessing spawn, each a `Worker`
loop in its own process, so no GIL is shared) on a CPU-bound stub job (a pure-Python loop of
``--stub-s`` seconds), on the embedded queue (SQLite) and on RabbitMQ + PostgreSQL. The queue
is filled first; the clock starts when the idle workers are told to go and stops at the last
ack. Scaling efficiency = (jobs/s with 2) / (2 x jobs/s with 1). For reference the same stub
runs in 1 and 2 bare processes (no LesionWatch): the machine's own ceiling for this load.
Per-phase times inside the worker are taken by wrapping the broker, the relay and the
worker's transaction helper (diagnostics only; the service code runs unchanged).

Run: ``.venv/bin/python tests/benchmarks/bench_broker.py [--jobs 200] [--quick]``
(Celery: ``pip install '.[bench]'``). Needs PostgreSQL and RabbitMQ as the integration
tests do (tests/conftest.py: LESIONWATCH_TEST_POSTGRES_URL, LESIONWATCH_TEST_RABBITMQ_URL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import queue as queue_module
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.queues import Queue as MPQueue
from pathlib import Path
from typing import Any, TypeVar, cast

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conftest import POSTGRES_URL, RABBITMQ_URL, fresh_postgres_schema  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402
from work_harness import SeededStudy, Site, seed_studies, site  # noqa: E402

from lesionwatch.config.schema import LesionWatchConfig  # noqa: E402
from lesionwatch.service.broker import Broker, QueueDepth, ReceivedMessage  # noqa: E402
from lesionwatch.service.broker.base import DeadLetter  # noqa: E402
from lesionwatch.service.db.engine import write_session  # noqa: E402
from lesionwatch.service.db.models import Job  # noqa: E402
from lesionwatch.service.executor import SubprocessExecutor  # noqa: E402
from lesionwatch.service.job_execution import (  # noqa: E402
    ExecResult,
    PipelineRequest,
    ReportRequest,
)
from lesionwatch.service.jobs import publish_job  # noqa: E402
from lesionwatch.service.outbox import OutboxRelay  # noqa: E402
from lesionwatch.service.server import Runtime  # noqa: E402
from lesionwatch.service.worker import Worker  # noqa: E402

__all__ = ["main"]

T = TypeVar("T")

# Production settings (the test harness shortens leases and polling).
PRODUCTION = {
    "worker.lease_s": 60,
    "broker.poll_interval_s": 1.0,
    "broker.heartbeat_s": 60,
    "log_level": "WARNING",
}
JOB_QUEUE = "jobs"
RAW_QUEUE = "bench-raw"
WARM_QUEUE = "bench-warm"
WARMUP = 10  # unmeasured jobs before each measured series (connections, statement caches)
CELERY_TASK = "lwbench.noop"
WORKER_THREAD = "bench-worker"
_RELAY_PASS = "producer's relay pass"
_AFTER_ACK = ("relay pass (after ack)", "worker row (idle)")

# -- observation: when each message is received and acked, and where a job's time goes -------


class Watch:
    """Receive and ack times per message key, and seconds per phase per key."""

    def __init__(self, on_ack: Callable[[str, float], None] | None = None) -> None:
        self._condition = threading.Condition()
        self._on_ack = on_ack
        self.published: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self.phases: dict[str, dict[str, float]] = {}
        self.current = ""  # the message the worker thread holds now
        self.receiving = threading.Event()  # the consumer waits in receive (idle)

    def add(self, phase: str, seconds: float, key: str | None = None) -> None:
        with self._condition:
            spans = self.phases.setdefault(self.current if key is None else key, {})
            spans[phase] = spans.get(phase, 0.0) + seconds

    def note_published(self, key: str, at: float) -> None:
        with self._condition:
            self.published[key] = at

    def note_received(self, key: str, at: float) -> None:
        with self._condition:
            self.received[key] = at
            self.current = key

    def note_acked(self, key: str, at: float) -> None:
        with self._condition:
            self.acked[key] = at
            self._condition.notify_all()
        if self._on_ack is not None:
            self._on_ack(key, at)

    def wait_idle(self, timeout_s: float) -> None:
        """Until the consumer is back in `receive` (done with what follows its last ack)."""
        if not self.receiving.wait(timeout_s):
            raise TimeoutError("the consumer did not return to receive")

    def wait_acked(self, keys: Sequence[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while not all(key in self.acked for key in keys):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sum(key not in self.acked for key in keys)
                    raise TimeoutError(f"{missing} of {len(keys)} message(s) not acked in time")
                self._condition.wait(remaining)

    def totals(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds per phase summed over `keys`."""
        summed: dict[str, float] = {}
        with self._condition:
            for key in keys:
                for phase, seconds in self.phases.get(key, {}).items():
                    summed[phase] = summed.get(phase, 0.0) + seconds
        return summed


def _job_key(body: bytes) -> str:
    return str(json.loads(body)["job_id"])


def _raw_key(body: bytes) -> str:
    return body.decode()


class _ObservedMessage(ReceivedMessage):
    def __init__(self, inner: ReceivedMessage, key: str, watch: Watch) -> None:
        super().__init__(inner.queue, inner.body, inner.delivery_count, inner.priority)
        self._inner = inner
        self._key = key
        self._watch = watch

    def ack(self) -> None:
        self._settle()
        started = time.monotonic()
        self._inner.ack()
        done = time.monotonic()
        self._watch.add("ack", done - started, self._key)
        self._watch.note_acked(self._key, done)

    def retry(self, delay_s: float, reason: str) -> None:
        self._settle()
        self._inner.retry(delay_s, reason)

    def release(self) -> None:
        self._settle()
        self._inner.release()

    def dead_letter(self, reason: str) -> None:
        self._settle()
        self._inner.dead_letter(reason)

    def heartbeat(self) -> bool:
        return self._inner.heartbeat()


class ObservedBroker(Broker):
    """Delegates to a real broker; notes when each message is received and acked."""

    def __init__(self, inner: Broker, watch: Watch, key: Callable[[bytes], str]) -> None:
        self._inner = inner
        self._watch = watch
        self._key = key

    def declare(self, queues: Sequence[str]) -> None:
        self._inner.declare(queues)

    def publish(self, queue: str, body: bytes, *, priority: int = 0, message_id: str = "") -> None:
        # When the call starts: RabbitMQ may deliver the message before its confirm arrives.
        self._watch.note_published(self._key(body), time.monotonic())
        self._inner.publish(queue, body, priority=priority, message_id=message_id)

    def receive(self, queues: Sequence[str], timeout_s: float) -> ReceivedMessage | None:
        started = time.monotonic()
        self._watch.receiving.set()
        message = self._inner.receive(queues, timeout_s)
        if message is None:
            return None
        self._watch.receiving.clear()
        done = time.monotonic()
        key = self._key(message.body)
        self._watch.note_received(key, done)
        # With a full queue this is the claim of a message; with an empty one it includes the
        # wait for the next publish (part 1 reports delivery from timestamps instead).
        self._watch.add("receive call", done - started, key)
        return _ObservedMessage(message, key, self._watch)

    def depth(self, queue: str) -> QueueDepth:
        return self._inner.depth(queue)

    def dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        return self._inner.dead_letters(queue, limit)

    def ping(self) -> None:
        self._inner.ping()

    def close(self) -> None:
        self._inner.close()

    @property
    def description(self) -> str:
        return self._inner.description


class TimedRelay(OutboxRelay):
    """The process's one relay; passes made by the worker thread (after each ack) are timed."""

    def __init__(self, sessions: sessionmaker[Session], broker: Broker, watch: Watch) -> None:
        super().__init__(sessions, broker)
        self._watch = watch

    def publish_pending(self) -> int:
        started = time.monotonic()
        published = super().publish_pending()
        if threading.current_thread().name == WORKER_THREAD:
            self._watch.add("relay pass (after ack)", time.monotonic() - started)
        return published


_DB_PHASES = ("claim job tx", "read inputs tx", "complete job tx", "other tx")


class TimedWorker(Worker):
    """The real Worker, with its transactions and worker-row updates timed (diagnostics)."""

    def __init__(self, watch: Watch, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._watch = watch
        self._db_calls = 0

    def _handle(self, message: ReceivedMessage, stop: threading.Event) -> None:
        self._db_calls = 0
        super()._handle(message, stop)

    def _with_db(
        self,
        work: Callable[[Session], T],
        message: ReceivedMessage,
        stop: threading.Event | None,
        max_wait_s: float,
        *,
        write: bool = True,
    ) -> T:
        # A successful job makes exactly these calls, in this order: claim, inputs, complete.
        phase = _DB_PHASES[min(self._db_calls, len(_DB_PHASES) - 1)]
        self._db_calls += 1
        started = time.monotonic()
        try:
            return super()._with_db(work, message, stop, max_wait_s, write=write)
        finally:
            self._watch.add(phase, time.monotonic() - started)

    def _record_worker(self, state: str, job_id: int | None, *, force: bool = False) -> None:
        started = time.monotonic()
        super()._record_worker(state, job_id, force=force)
        self._watch.add(f"worker row ({state})", time.monotonic() - started)


class StubExecutor:
    """Stands in for the executor process: returns at once, or after a pure-Python loop."""

    device = "cpu"

    def __init__(self, watch: Watch, iterations: int = 0) -> None:
        self._watch = watch
        self._iterations = iterations

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def run(
        self,
        request: PipelineRequest | ReportRequest,
        *,
        timeout_s: float,
        should_stop: Callable[[], str | None] = lambda: None,
    ) -> ExecResult:
        started, cpu = time.monotonic(), time.thread_time()
        spin(self._iterations)
        self._watch.add("executor", time.monotonic() - started)
        # Less CPU than wall time: the machine did not give this process a core throughout.
        self._watch.add("executor CPU", time.thread_time() - cpu)
        record = {"kind": "finding", "finding_type": "ms_lesion", "lesion_count": 0}
        return ExecResult((), record, {}, "benchmark stub")


def spin(iterations: int) -> int:
    """The CPU-bound stub job: pure Python, holds the GIL throughout."""
    total = 0
    for value in range(iterations):
        total += value * value % 7
    return total


def calibrate(seconds: float) -> int:
    """Loop iterations that take about `seconds` here (best of three, so load inflates less)."""
    probe = 1_000_000
    best = min(_timed(lambda: spin(probe)) for _ in range(3))
    return max(1, int(probe * seconds / best))


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _timed_with_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of `fn` on this thread."""
    started, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - started, time.thread_time() - cpu


def make_worker(
    runtime: Runtime, config: LesionWatchConfig, watch: Watch, iterations: int, identity: str
) -> TimedWorker:
    """A Worker on `runtime`'s broker and relay (the relay is replaced by a timed one)."""
    broker = ObservedBroker(runtime.broker, watch, _job_key)
    runtime.relay = TimedRelay(runtime.sessions, broker, watch)
    return TimedWorker(
        watch,
        identity=identity,
        config=config,
        sessions=runtime.sessions,
        broker=broker,
        relay=runtime.relay,
        executor=cast(SubprocessExecutor, StubExecutor(watch, iterations)),
        queues=(JOB_QUEUE,),
    )


_SERVERS = frozenset({"postgres", "beam.smp"})
_WHO = ("benchmark", "servers", "other")


class CpuMeter:
    """Cores busy during a run: this benchmark's processes, the servers (PostgreSQL,
    RabbitMQ) and everything else on the machine (Linux /proc; nothing elsewhere)."""

    def __init__(self, own_pids: Sequence[int]) -> None:
        self._own = set(own_pids)
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _sample(self) -> tuple[float, dict[int, tuple[str, float]]] | None:
        try:
            with open("/proc/stat") as stat:
                ticks = [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / self._hz  # all but idle and iowait
        processes: dict[int, tuple[str, float]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as stat:
                    line = stat.read()
            except OSError:
                continue  # exited meanwhile
            fields = line[line.rindex(")") + 2 :].split()
            comm = line[line.index("(") + 1 : line.rindex(")")]
            processes[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / self._hz)
        return busy, processes

    @contextlib.contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        before, started = self._sample(), time.monotonic()
        yield
        after, seconds = self._sample(), time.monotonic() - started
        if before is None or after is None or seconds <= 0:
            return
        used = {"benchmark": 0.0, "servers": 0.0}
        for pid, (comm, cpu) in after[1].items():
            spent = cpu - before[1].get(pid, (comm, 0.0))[1]
            if pid in self._own:
                used["benchmark"] += spent
            elif comm in _SERVERS:
                used["servers"] += spent
        used["other"] = max(0.0, after[0] - before[0] - used["benchmark"] - used["servers"])
        into.update({who: cpu / seconds for who, cpu in used.items()})


# -- seeding ---------------------------------------------------------------------------------


def add_jobs(sessions: sessionmaker[Session], studies: Sequence[SeededStudy]) -> list[str]:
    """One FLAIR job per study with its outbox message, in ONE transaction (the assembler's);
    the keys (job ids) of the messages."""
    now = datetime.now(UTC)
    keys = []
    with write_session(sessions) as session:
        for study in studies:
            job = Job(study_id=study.study_id, pipeline="flair", queue=JOB_QUEUE,
                      created_at=now, updated_at=now)  # fmt: skip
            session.add(job)
            session.flush()
            publish_job(session, job, study.uid)
            keys.append(str(job.id))
    return keys


# -- part 1: overhead per job ----------------------------------------------------------------


@dataclass
class Overhead:
    system: str
    path: str
    latencies_s: list[float]
    drain_jobs: int
    drain_s: float
    phases_ms: dict[str, float] = field(default_factory=dict)  # mean per sequential job
    load: dict[str, float] = field(default_factory=dict)  # cores busy during the run, by whom

    @property
    def jobs_per_s(self) -> float:
        return self.drain_jobs / self.drain_s


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ack_timeout(jobs: int) -> float:
    return 60.0 + 2.0 * jobs


@contextlib.contextmanager
def worker_thread(worker: Worker) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=WORKER_THREAD, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def job_path(system: str, where: Site, jobs: int) -> Overhead:
    """LesionWatch's job path, sequential then drain, with one in-process Worker thread."""
    runtime = Runtime(where.config)
    try:
        runtime.broker.declare(runtime.queues())
        watch = Watch()
        worker = make_worker(runtime, where.config, watch, 0, "bench:0")
        relay = runtime.relay  # shared by the producer and the worker, as in one process
        studies = seed_studies(runtime.sessions, WARMUP + 2 * jobs, hold_open=True)
        with worker_thread(worker):
            latencies: list[float] = []
            measured: list[str] = []
            for index, study in enumerate(studies[: WARMUP + jobs]):
                watch.wait_idle(_ack_timeout(1))  # each job finds an idle worker
                started = time.monotonic()
                (key,) = add_jobs(runtime.sessions, [study])
                committed = time.monotonic()
                relay.publish_pending()
                relayed = time.monotonic()
                watch.wait_acked([key], _ack_timeout(1))
                publishing = watch.published[key]
                watch.add("commit job + outbox", committed - started, key)
                watch.add("relay: claim outbox row", publishing - committed, key)
                watch.add("publish -> received", watch.received[key] - publishing, key)
                # The rest of the pass (confirm, delete the outbox row) overlaps the worker.
                watch.add(_RELAY_PASS, relayed - committed, key)
                if index >= WARMUP:
                    latencies.append(watch.acked[key] - started)
                    measured.append(key)
            phases = {p: s * 1000 / len(measured) for p, s in watch.totals(measured).items()}
            phases.pop("receive call", None)  # includes idle waiting here; see "delivery"
            phases.pop("executor CPU", None)
            watch.wait_idle(_ack_timeout(1))
            started = time.monotonic()
            keys = add_jobs(runtime.sessions, studies[WARMUP + jobs :])
            relay.publish_pending()
            watch.wait_acked(keys, _ack_timeout(jobs))
            drain_s = max(watch.acked[k] for k in keys) - started
        return Overhead(system, "job path", latencies, jobs, drain_s, phases)
    finally:
        runtime.close()


def raw_broker(system: str, broker: Broker, jobs: int) -> Overhead:
    """The Broker object alone: publish, a consumer thread receives and acks."""
    watch = Watch()
    observed = ObservedBroker(broker, watch, _raw_key)
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            message = observed.receive([RAW_QUEUE], timeout_s=1.0)
            if message is not None:
                message.ack()

    broker.declare([RAW_QUEUE])
    thread = threading.Thread(target=consume, name="bench-consumer", daemon=True)
    thread.start()
    try:
        latencies = []
        for index in range(WARMUP + jobs):
            key = f"seq-{index}"
            watch.wait_idle(_ack_timeout(1))
            started = time.monotonic()
            broker.publish(RAW_QUEUE, key.encode())
            watch.wait_acked([key], _ack_timeout(1))
            if index >= WARMUP:
                latencies.append(watch.acked[key] - started)
        keys = [f"drain-{index}" for index in range(jobs)]
        watch.wait_idle(_ack_timeout(1))
        started = time.monotonic()
        for key in keys:
            broker.publish(RAW_QUEUE, key.encode())
        watch.wait_acked(keys, _ack_timeout(jobs))
        drain_s = max(watch.acked[k] for k in keys) - started
    finally:
        stop.set()
        thread.join(30)
    return Overhead(system, "raw broker", latencies, jobs, drain_s)


def lesionwatch_overheads(
    label: str, backend: str, tmp: Path, jobs: int, **overrides: Any
) -> list[Overhead]:
    started = time.monotonic()
    meter = CpuMeter([os.getpid()])
    loads: list[dict[str, float]] = [{}, {}]
    with site(backend, tmp, **PRODUCTION, **overrides) as where:
        with meter.measure(loads[0]):
            figures = [job_path(label, where, jobs)]
        runtime = Runtime(where.config)
        try:
            with meter.measure(loads[1]):
                figures.append(raw_broker(label, runtime.broker, jobs))
        finally:
            runtime.close()
    for figure, load in zip(figures, loads, strict=True):
        figure.load = load
    print(f"  {label} done in {time.monotonic() - started:.0f} s", flush=True)
    return figures


# -- part 1: Celery ----------------------------------------------------------------------------


def celery_app(queue: str, *, worker: bool = False) -> Any:
    from celery import Celery

    app = Celery("lwbench", broker=RABBITMQ_URL, backend="rpc://")
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
    )
    if not worker:
        # LesionWatch's publish waits for RabbitMQ's confirm: so does the client's send_task.
        # Not in the worker: with confirms on its result publishes, Celery 5.7's worker
        # sporadically leaves a delivered task unseen for its event loop's 10 s poll timeout.
        app.conf.broker_transport_options = {"confirm_publish": True}

    @app.task(name=CELERY_TASK)
    def noop(index: int) -> int:
        return index

    return app


def run_celery_worker(queue: str) -> None:
    app = celery_app(queue, worker=True)
    app.worker_main(
        ["worker", "--pool=solo", "--concurrency=1", "--loglevel=WARNING", "-Q", queue]
        + ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        + ["-n", f"{queue}@%h"]
    )


def celery_overhead(jobs: int, workdir: Path) -> Overhead:
    queue = f"lwbench-celery-{uuid.uuid4().hex[:8]}"
    log_path = workdir / "celery-worker.log"
    app = celery_app(queue)
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--celery-worker", queue], stdout=log, stderr=log
        )
    try:
        try:
            app.send_task(CELERY_TASK, args=(0,)).get(timeout=120)  # the worker is up
        except Exception as exc:
            raise RuntimeError(f"celery worker: {exc!r}; {log_path.read_text()[-2000:]}") from exc
        latencies = []
        load: dict[str, float] = {}
        with CpuMeter([os.getpid(), worker.pid]).measure(load):
            for index in range(WARMUP + jobs):
                started = time.monotonic()
                app.send_task(CELERY_TASK, args=(index,)).get(timeout=_ack_timeout(1))
                if index >= WARMUP:
                    latencies.append(time.monotonic() - started)
            started = time.monotonic()
            results = [app.send_task(CELERY_TASK, args=(index,)) for index in range(jobs)]
            for result in results:
                result.get(timeout=_ack_timeout(jobs))
            drain_s = time.monotonic() - started
    finally:
        # Every task is acked by now. Celery's warm shutdown notices SIGTERM only when its
        # event loop's ~10 s poll ends; no need to wait for that.
        worker.terminate()
        try:
            worker.wait(2)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        _delete_celery_queue(queue)
        app.close()
    return Overhead("Celery 5 on RabbitMQ", "no-op task", latencies, jobs, drain_s, load=load)


def _delete_celery_queue(queue: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)  # Celery's default exchange has the queue's name
    finally:
        connection.close()


# -- part 2: scaling -------------------------------------------------------------------------


def scaling_worker(
    index: int,
    config: LesionWatchConfig,
    iterations: int,
    control: MPQueue[tuple[str, int]],
    results: MPQueue[tuple[Any, ...]],
) -> None:
    """One worker process: a Worker loop per "run" command until "stop"; "bare" runs the stub
    without LesionWatch; "exit" ends the process."""
    logging.basicConfig(level=logging.WARNING)
    import lesionwatch.pipelines.registry  # noqa: F401 - the worker imports it (torch) at job 1

    # Every run is on this thread: the RabbitMQ broker keeps a thread's consumer connection,
    # so later runs find it open, as a worker process does from one job to the next.
    threading.current_thread().name = WORKER_THREAD
    runtime = Runtime(config)
    try:
        runtime.broker.ping()
        runtime.broker.receive([WARM_QUEUE], timeout_s=1.0)  # opens this thread's connection
        results.put(("ready", index))
        while True:
            command, count = control.get()
            if command == "exit":
                return
            if command == "bare":
                spent = [_timed_with_cpu(lambda: spin(iterations)) for _ in range(count)]
                results.put(("bare", index, time.monotonic(), spent))
                continue
            watch = Watch(on_ack=lambda key, at: results.put(("ack", index, key, at)))
            worker = make_worker(runtime, config, watch, iterations, f"bench:{index}")
            stop = threading.Event()
            waiter = threading.Thread(target=_stop_on_command, args=(control, stop), daemon=True)
            waiter.start()
            cpu = time.process_time()
            worker.run(stop)
            watch.add("process CPU", time.process_time() - cpu)
            waiter.join()
            results.put(("phases", index, watch.totals(list(watch.acked)), len(watch.acked)))
    finally:
        runtime.close()


def _stop_on_command(control: MPQueue[tuple[str, int]], stop: threading.Event) -> None:
    control.get()  # ("stop", 0)
    stop.set()


@dataclass
class ScalingRun:
    workers: int
    jobs: int
    seconds: float
    mean_stub_s: float  # wall time of the loop
    mean_stub_cpu_s: float  # CPU time of the loop
    phases_ms: dict[str, float]  # mean per job, LesionWatch runs only
    load: dict[str, float] = field(default_factory=dict)  # cores busy during the run, by whom

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


def _expect(results: MPQueue[tuple[Any, ...]], kind: str, timeout_s: float) -> tuple[Any, ...]:
    try:
        item = results.get(timeout=timeout_s)
    except queue_module.Empty:
        raise TimeoutError(f"no {kind!r} from the worker processes in {timeout_s:.0f} s") from None
    if item[0] != kind:
        raise RuntimeError(f"expected {kind!r} from a worker process, got {item!r}")
    return item


class _Pool:
    """Two spawned worker processes on one site, told what to run through control queues."""

    def __init__(self, where: Site, iterations: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.runtime = Runtime(where.config)
        self.results: MPQueue[tuple[Any, ...]] = context.Queue()
        self.controls: list[MPQueue[tuple[str, int]]] = [context.Queue() for _ in range(2)]
        self.processes = [
            context.Process(
                target=scaling_worker,
                args=(index, where.config, iterations, self.controls[index], self.results),
                name=f"bench-worker-{index}",
                daemon=True,
            )
            for index in range(2)
        ]

    def __enter__(self) -> _Pool:
        self.runtime.broker.declare([*self.runtime.queues(), WARM_QUEUE])
        for process in self.processes:
            process.start()
        for _ in self.processes:
            _expect(self.results, "ready", 180)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for control in self.controls:
            control.put(("exit", 0))
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
        self.runtime.close()

    def lesionwatch(self, workers: int, jobs: int, meter: CpuMeter | None = None) -> ScalingRun:
        """`jobs` queued first, then `workers` idle Workers told to go; until the last ack."""
        runtime = self.runtime
        keys = set(add_jobs(runtime.sessions, seed_studies(runtime.sessions, jobs, hold_open=True)))
        if runtime.relay.publish_pending() != jobs:
            raise RuntimeError("the relay did not publish every job")
        load: dict[str, float] = {}
        with meter.measure(load) if meter is not None else contextlib.nullcontext():
            started = time.monotonic()
            for control in self.controls[:workers]:
                control.put(("run", 0))
            last = started
            for _ in range(jobs):
                _, _, key, at = _expect(self.results, "ack", _ack_timeout(jobs))
                keys.discard(key)
                last = max(last, at)
        for control in self.controls[:workers]:
            control.put(("stop", 0))
        phases: dict[str, float] = {}
        done = 0
        for _ in range(workers):
            _, _, totals, count = _expect(self.results, "phases", 60)
            done += count
            for phase, seconds in totals.items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        if done != jobs or keys:
            raise RuntimeError(f"{done} acks reported for {jobs} jobs")
        stub, stub_cpu = phases.pop("executor", 0.0) / jobs, phases.pop("executor CPU", 0.0) / jobs
        # Worker-process CPU outside the stub, all threads, idle polling at the end included.
        phases["worker CPU, all threads"] = phases.pop("process CPU", 0.0) - stub_cpu * jobs
        phases.pop("worker row (stopped)", None)  # once per run, not per job
        per_job = {phase: s * 1000 / jobs for phase, s in phases.items()}
        return ScalingRun(workers, jobs, last - started, stub, stub_cpu, per_job, load)

    def bare(self, workers: int, jobs: int) -> ScalingRun:
        """The stub alone in the same processes, `jobs` split evenly: the machine's ceiling."""
        started = time.monotonic()
        for index, control in enumerate(self.controls[:workers]):
            control.put(("bare", len(range(index, jobs, workers))))
        last = started
        durations: list[tuple[float, float]] = []
        for _ in range(workers):
            _, _, at, spent = _expect(self.results, "bare", _ack_timeout(jobs))
            last = max(last, at)
            durations += spent
        wall = statistics.mean(d[0] for d in durations)
        cpu = statistics.mean(d[1] for d in durations)
        return ScalingRun(workers, jobs, last - started, wall, cpu, {})


def scaling(
    label: str, where: Site, jobs: int, iterations: int, rounds: int
) -> tuple[list[ScalingRun], list[ScalingRun]]:
    """(LesionWatch runs, bare runs) with 1 and 2 worker processes, rounds interleaved."""
    lw_runs: list[ScalingRun] = []
    bare_runs: list[ScalingRun] = []
    with _Pool(where, iterations) as pool:
        meter = CpuMeter([os.getpid(), *(p.pid or 0 for p in pool.processes)])
        pool.lesionwatch(2, 4)  # warm-up, not counted: first statements, pool connections
        for round_index in range(rounds):
            for workers in (1, 2):
                lw_runs.append(pool.lesionwatch(workers, jobs, meter))
                bare_runs.append(pool.bare(workers, jobs))
                print(
                    f"  round {round_index + 1} {label:22s} {workers} worker(s): "
                    f"{lw_runs[-1].jobs_per_s:5.2f} jobs/s (bare: {bare_runs[-1].jobs_per_s:5.2f});"
                    " cores busy: "
                    + ", ".join(f"{who} {cores:.2f}" for who, cores in lw_runs[-1].load.items()),
                    flush=True,
                )
    return lw_runs, bare_runs


# -- report ----------------------------------------------------------------------------------


def machine() -> str:
    lines = [
        f"machine: {os.cpu_count()} CPU cores, {platform.platform()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
    ]
    with contextlib.suppress(Exception):
        import sqlalchemy

        engine = sqlalchemy.create_engine(POSTGRES_URL)
        with engine.connect() as conn:
            lines.append(f"PostgreSQL {conn.exec_driver_sql('SHOW server_version').scalar()}")
        engine.dispose()
    with contextlib.suppress(Exception):
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        version = connection._impl.server_properties.get("version", b"?")
        connection.close()
        lines[-1] += f", RabbitMQ {version.decode() if isinstance(version, bytes) else version}"
    with contextlib.suppress(Exception):
        import celery

        lines[-1] += f", Celery {celery.__version__}"
    return "\n".join(lines)


def print_overheads(figures: Sequence[Overhead], jobs: int) -> None:
    print(
        f"\nPart 1: overhead per trivial job. Sequential: publish one, wait for its ack "
        f"(Celery: its result), {jobs} times. Drain: {jobs} published at once into an idle worker."
    )
    print(
        f"{'system':24s} {'what is timed':12s} {'mean ms':>8s} {'p50 ms':>7s} {'p95 ms':>7s}"
        f" {'drain jobs/s':>13s}   cores busy: benchmark, servers, other"
    )
    for f in figures:
        mean, p50, p95 = (
            statistics.mean(f.latencies_s) * 1000,
            percentile(f.latencies_s, 50) * 1000,
            percentile(f.latencies_s, 95) * 1000,
        )
        busy = ", ".join(f"{f.load.get(who, float('nan')):.2f}" for who in _WHO)
        print(
            f"{f.system:24s} {f.path:12s} {mean:8.2f} {p50:7.2f} {p95:7.2f} {f.jobs_per_s:13.1f}"
            f"   {busy}"
        )
    print(
        "  job path: job row + outbox commit, relay publish, receive, claim / inputs / busy /"
        "\n    complete transactions, ack (LesionWatch's job-state transactions included)."
        "\n  raw broker: Broker.publish -> receive -> ack, no job rows."
        "\n  Celery: send_task (confirmed) -> no-op task -> result via rpc:// -> late ack;"
        "\n    no database, no job state (compare with LesionWatch's raw broker row)."
    )
    by_key = {(f.system, f.path): f for f in figures}
    celery = next((f for f in figures if f.path == "no-op task"), None)
    rabbit_job = by_key.get(("RabbitMQ+PostgreSQL", "job path"))
    rabbit_raw = by_key.get(("RabbitMQ+PostgreSQL", "raw broker"))
    if celery is not None:
        print("\nRatios against Celery on the same RabbitMQ (p50 latency; drain throughput):")
        for name, mine in (("job path", rabbit_job), ("raw broker", rabbit_raw)):
            if mine is None:
                continue
            latency = percentile(mine.latencies_s, 50) / percentile(celery.latencies_s, 50)
            throughput = mine.jobs_per_s / celery.jobs_per_s
            print(
                f"  LesionWatch RabbitMQ {name:10s}: latency x{latency:.2f} of Celery's,"
                f" throughput x{throughput:.2f} of Celery's"
            )
    print("\nWhere a sequential job's time goes (mean ms per job; before the ack unless noted):")
    paths = [f for f in figures if f.path == "job path"]
    phases = list(dict.fromkeys(p for f in paths for p in f.phases_ms))
    order = [
        "commit job + outbox",
        "relay: claim outbox row",
        "publish -> received",
        "claim job tx",
        "worker row (busy)",
        "read inputs tx",
        "executor",
        "complete job tx",
        "ack",
    ]
    rest = [p for p in phases if p not in order and p not in _AFTER_ACK and p != _RELAY_PASS]
    print(f"  {'phase':34s}" + "".join(f" {f.system:>21s}" for f in paths))
    for phase in [p for p in order if p in phases] + rest:
        print(f"  {phase:34s}" + "".join(f" {f.phases_ms.get(phase, 0.0):21.2f}" for f in paths))
    sums = [sum(v for p, v in f.phases_ms.items() if p in order or p in rest) for f in paths]
    print(f"  {'sum of the above':34s}" + "".join(f" {v:21.2f}" for v in sums))
    means = [statistics.mean(f.latencies_s) * 1000 for f in paths]
    print(f"  {'measured mean latency':34s}" + "".join(f" {v:21.2f}" for v in means))
    print("  not in the latency (after the ack, or overlapping the worker):")
    for phase in [*_AFTER_ACK, _RELAY_PASS]:
        print(f"  {phase:34s}" + "".join(f" {f.phases_ms.get(phase, 0.0):21.2f}" for f in paths))


def print_scaling(results: dict[str, tuple[list[ScalingRun], list[ScalingRun]]]) -> None:
    print(
        "\nPart 2: jobs/s with 1 and 2 worker processes on the CPU-bound stub (best | median of"
        " rounds).\n  Per job and worker (best round): wall = workers x makespan / jobs; stub ="
        " the loop's wall time\n  and its CPU time (less CPU than wall: no free core); rest ="
        " wall - stub = LesionWatch + idle;\n  cores busy meanwhile in PostgreSQL + RabbitMQ"
        " (servers) and in other processes (other work on\n  this machine, which the 2-worker"
        " figure cannot tell from LesionWatch's own cost)."
    )
    print(
        f"{'backend':22s} {'workers':>7s} {'jobs/s':>15s} {'wall ms':>8s} {'stub ms':>8s}"
        f" {'stub CPU':>8s} {'rest ms':>8s} {'cores: servers':>14s} {'other':>5s}"
        "   bare stub: jobs/s, stub ms, stub CPU ms"
    )
    for label, (lw_runs, bare_runs) in results.items():
        for workers in (1, 2):
            mine = [r for r in lw_runs if r.workers == workers]
            bare = [r for r in bare_runs if r.workers == workers]
            best = max(mine, key=lambda r: r.jobs_per_s)
            best_bare = max(bare, key=lambda r: r.jobs_per_s)
            wall = workers * best.seconds / best.jobs * 1000
            stub, stub_cpu = best.mean_stub_s * 1000, best.mean_stub_cpu_s * 1000
            print(
                f"{label:22s} {workers:7d} {best.jobs_per_s:6.2f} |"
                f" {statistics.median(r.jobs_per_s for r in mine):6.2f}"
                f" {wall:8.1f} {stub:8.1f} {stub_cpu:8.1f} {wall - stub:8.1f}"
                f" {best.load.get('servers', float('nan')):14.2f}"
                f" {best.load.get('other', float('nan')):5.2f}"
                f"   {best_bare.jobs_per_s:6.2f} |"
                f" {statistics.median(r.jobs_per_s for r in bare):6.2f},"
                f" {best_bare.mean_stub_s * 1000:6.1f}, {best_bare.mean_stub_cpu_s * 1000:6.1f}"
            )
    print("\nScaling efficiency (jobs/s with 2) / (2 x jobs/s with 1); target >= 0.9:")
    for label, (lw_runs, bare_runs) in results.items():
        ours = _efficiency(lw_runs)
        ceiling = _efficiency(bare_runs)
        verdict = "met" if ours[0] >= 0.9 else "NOT met"
        print(
            f"  {label:22s} {ours[0]:.2f} best | {ours[1]:.2f} median ({verdict} on best);"
            f"\n    the bare stub in the same processes (the machine's ceiling during this run):"
            f" {ceiling[0]:.2f} | {ceiling[1]:.2f};\n    LesionWatch / ceiling:"
            f" {ours[0] / ceiling[0]:.2f} | {ours[1] / ceiling[1]:.2f}"
        )
    print("\nLesionWatch time per job outside the stub (mean ms per job, all workers; best round):")
    labels = list(results)
    print(f"  {'phase':26s}" + "".join(f" {f'{lb} x{w}':>24s}" for lb in labels for w in (1, 2)))
    columns = []
    for label in labels:
        for workers in (1, 2):
            runs = [r for r in results[label][0] if r.workers == workers]
            columns.append(dict(max(runs, key=lambda r: r.jobs_per_s).phases_ms))
    cpu_row = "worker CPU, all threads"
    cpu = [c.pop(cpu_row, 0.0) for c in columns]
    phases = list(dict.fromkeys(p for c in columns for p in c))
    for phase in phases:
        print(f"  {phase:26s}" + "".join(f" {c.get(phase, 0.0):24.2f}" for c in columns))
    totals = [sum(c.values()) for c in columns]
    print(f"  {'total outside the stub':26s}" + "".join(f" {t:24.2f}" for t in totals))
    print(f"  {cpu_row:26s}" + "".join(f" {t:24.2f}" for t in cpu))


def _efficiency(runs: Sequence[ScalingRun]) -> tuple[float, float]:
    one = [r.jobs_per_s for r in runs if r.workers == 1]
    two = [r.jobs_per_s for r in runs if r.workers == 2]
    return max(two) / (2 * max(one)), statistics.median(two) / (2 * statistics.median(one))


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per part-1 series")
    parser.add_argument("--scaling-jobs", type=int, default=30, help="jobs per part-2 run")
    parser.add_argument("--stub-s", type=float, default=0.3, help="CPU stub job length")
    parser.add_argument("--rounds", type=int, default=3, help="part-2 rounds (interleaved)")
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true", help="part 2 only")
    parser.add_argument("--skip-scaling", action="store_true", help="part 1 only")
    parser.add_argument("--celery-worker", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.celery_worker:
        run_celery_worker(args.celery_worker)
        return 0
    if args.quick:
        args.jobs, args.scaling_jobs, args.stub_s, args.rounds = 20, 6, 0.2, 1
    logging.basicConfig(level=logging.WARNING)
    celery_missing = False
    try:
        import celery  # noqa: F401
    except ImportError:
        celery_missing = True

    print(machine())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as temp:
        workdir = Path(temp)
        if not args.skip_overhead:
            print("\nPart 1 runs ...", flush=True)
            figures: list[Overhead] = []
            figures += lesionwatch_overheads(
                "embedded/SQLite", "embedded-sqlite", workdir / "sqlite", args.jobs
            )
            with fresh_postgres_schema(f"bench-broker-{uuid.uuid4().hex}") as url:
                figures += lesionwatch_overheads(
                    "embedded/PostgreSQL",
                    "embedded-sqlite",
                    workdir / "pg",
                    args.jobs,
                    **{"database.url": url},
                )
            figures += lesionwatch_overheads(
                "RabbitMQ+PostgreSQL", "rabbitmq-postgresql", workdir / "rabbitmq", args.jobs
            )
            if args.skip_celery or celery_missing:
                print(
                    "  Celery skipped"
                    + (" (not installed: pip install '.[bench]')" * celery_missing)
                )
            else:
                begun = time.monotonic()
                figures.append(celery_overhead(args.jobs, workdir))
                print(f"  Celery done in {time.monotonic() - begun:.0f} s", flush=True)
            print_overheads(figures, args.jobs)

        if not args.skip_scaling:
            iterations = calibrate(args.stub_s)
            print(
                f"\nPart 2 runs: {args.scaling_jobs} jobs per run, stub {args.stub_s:g} s"
                f" ({iterations} loop iterations) ...",
                flush=True,
            )
            scaled: dict[str, tuple[list[ScalingRun], list[ScalingRun]]] = {}
            for label, backend in (
                ("embedded/SQLite", "embedded-sqlite"),
                ("RabbitMQ+PostgreSQL", "rabbitmq-postgresql"),
            ):
                begun = time.monotonic()
                with site(backend, workdir / f"scale-{backend}", **PRODUCTION) as where:
                    scaled[label] = scaling(
                        label, where, args.scaling_jobs, iterations, args.rounds
                    )
                print(f"  {label} done in {time.monotonic() - begun:.0f} s", flush=True)
            print_scaling(scaled)
    if args.quick:
        print("\n--quick is a smoke run: too few jobs for the figures to mean much.")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at the end {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
