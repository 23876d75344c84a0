"""`lesionwatch status` and `lesionwatch jobs list | show | retry | cancel`: for operators."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from sqlalchemy import select

from .cli_support import CommandError, add_connection_options, load_from_args
from .text_table import format_table

__all__ = ["add_ops_commands"]

_JOB_STATES = [
    "pending",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "skipped",
    "superseded",
]


def _ago(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    seconds = (now - then).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _runtime(args: argparse.Namespace) -> Any:
    from .server import Runtime

    return Runtime(load_from_args(args), existing=True)


def _cmd_status(args: argparse.Namespace) -> int:
    from .broker import BrokerError
    from .db.models import utcnow
    from .db.work_models import WorkerRecord

    runtime = _runtime(args)
    now = utcnow()
    try:
        print(f"broker: {runtime.broker.description}")
        try:
            runtime.broker.ping()
        except BrokerError as exc:
            print(f"  UNAVAILABLE: {exc}")
        else:
            rows = []
            for queue in runtime.queues():
                try:
                    depth = runtime.broker.depth(queue)
                    in_flight = "?" if depth.in_flight < 0 else depth.in_flight
                    rows.append((queue, depth.ready, in_flight, depth.delayed, depth.dead))
                except BrokerError as exc:
                    rows.append((queue, "?", "?", "?", f"unavailable: {exc}"))
            print(format_table(["queue", "ready", "in flight", "delayed", "dead"], rows, 60))
        jobs = runtime.job_counts()
        print("\njobs: " + (", ".join(f"{s} {n}" for s, n in sorted(jobs.items())) or "none"))
        deliveries = runtime.delivery_counts()
        print(
            "deliveries: "
            + (", ".join(f"{s} {n}" for s, n in sorted(deliveries.items())) or "none")
        )
        with runtime.sessions() as session:
            workers = session.scalars(
                select(WorkerRecord).order_by(WorkerRecord.last_heartbeat_at.desc())
            ).all()
            stale_s = 3 * max(10.0, runtime.config.worker.lease_s)
            worker_rows = [
                (
                    w.id,
                    w.state
                    if w.state == "stopped" or (now - w.last_heartbeat_at).total_seconds() < stale_s
                    else f"{w.state}? (silent)",
                    w.current_job_id or "-",
                    w.queues,
                    w.device or "-",
                    w.jobs_done,
                    _ago(w.last_heartbeat_at, now),
                )
                for w in workers[: args.workers]
            ]
        print("\nworkers:")
        print(
            format_table(
                ["worker", "state", "job", "queues", "device", "done", "last heartbeat"],
                worker_rows,
                40,
            )
            if worker_rows
            else "  none has started yet"
        )
    finally:
        runtime.close()
    return 0


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    from .db.models import Job, JobState, Study

    runtime = _runtime(args)
    try:
        with runtime.sessions() as session:
            query = (
                select(Job, Study.study_instance_uid)
                .join(Study, Job.study_id == Study.id)
                .order_by(Job.id.desc())
                .limit(args.limit)
            )
            if args.state:
                query = query.where(Job.state == JobState(args.state))
            if args.study:
                query = query.where(Study.study_instance_uid == args.study)
            rows = [
                (
                    job.id,
                    uid,
                    job.pipeline,
                    job.generation,
                    job.state.value,
                    job.attempt,
                    job.reason,
                )
                for job, uid in reversed(session.execute(query).all())
            ]
    finally:
        runtime.close()
    print(
        format_table(
            ["job", "study", "pipeline", "generation", "state", "attempt", "reason"], rows, 90
        )
    )
    return 0


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    from .db.delivery_models import Delivery
    from .db.models import Job, Study
    from .db.work_models import AuditEvent

    runtime = _runtime(args)
    try:
        with runtime.sessions() as session:
            job = session.get(Job, args.job_id)
            if job is None:
                raise CommandError(f"no job {args.job_id}")
            study = session.get_one(Study, job.study_id)
            print(f"job {job.id}: {job.pipeline} on study {study.study_instance_uid}")
            fields = [
                ("state", job.state.value),
                ("reason", job.reason or "-"),
                ("generation", job.generation),
                ("attempt", job.attempt),
                ("queue / priority", f"{job.queue} / {job.priority}"),
                ("created", job.created_at.isoformat(timespec="seconds")),
                (
                    "started",
                    job.started_at.isoformat(timespec="seconds") if job.started_at else "-",
                ),
                (
                    "finished",
                    job.finished_at.isoformat(timespec="seconds") if job.finished_at else "-",
                ),
                ("worker", job.lease_owner or "-"),
            ]
            if job.prior_study_id is not None:
                prior = session.get(Study, job.prior_study_id)
                fields.append(("prior study", prior.study_instance_uid if prior else "(deleted)"))
            width = max(len(name) for name, _ in fields)
            for name, value in fields:
                print(f"  {name:<{width}}  {value}")
            if job.timings_json:
                timings = json.loads(job.timings_json)
                print("  time per step: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
            deliveries = session.scalars(
                select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)
            ).all()
            if deliveries:
                print("\nresults sent:")
                print(
                    format_table(
                        ["object", "destination", "state", "attempts", "last"],
                        [
                            (
                                d.sop_instance_uid,
                                d.destination,
                                d.state.value,
                                d.attempts,
                                d.last_reason,
                            )
                            for d in deliveries
                        ],
                        60,
                    )
                )
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.job_id == job.id).order_by(AuditEvent.id)
            ).all()
            print("\nhistory:")
            print(
                format_table(
                    ["when", "who", "what", "detail"],
                    [
                        (
                            e.at.isoformat(timespec="seconds"),
                            e.actor,
                            e.action,
                            (f"{e.destination} " if e.destination else "") + e.detail,
                        )
                        for e in events
                    ],
                    90,
                )
            )
    finally:
        runtime.close()
    return 0


def _change_jobs(args: argparse.Namespace, action: str) -> int:
    from .audit import cli_actor
    from .db.engine import write_session
    from .db.models import utcnow
    from .jobs import JobTransitionError, cancel_job, retry_job

    runtime = _runtime(args)
    actor = cli_actor()
    failures = 0
    try:
        for job_id in args.job_ids:
            try:
                with write_session(runtime.sessions) as session:
                    if action == "retry":
                        job = retry_job(session, job_id, actor, now=utcnow())
                    else:
                        job = cancel_job(
                            session,
                            job_id,
                            actor,
                            report_queue=runtime.config.worker.report_queue,
                            now=utcnow(),
                        )
                    state = job.state.value
                print(f"job {job_id}: {state}")
            except JobTransitionError as exc:
                print(f"job {job_id}: {exc}")
                failures += 1
        runtime.relay.publish_pending()
    finally:
        runtime.close()
    return 1 if failures else 0


def _cmd_jobs_retry(args: argparse.Namespace) -> int:
    return _change_jobs(args, "retry")


def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    return _change_jobs(args, "cancel")


def add_ops_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = commands.add_parser(
        "status", help="Queue depths, jobs by state, workers and their last heartbeat."
    )
    status.add_argument("--workers", type=int, default=50, help="show at most this many workers")
    add_connection_options(status)
    status.set_defaults(handler=_cmd_status)

    jobs = commands.add_parser("jobs", help="List, show, retry or cancel jobs.")
    add_connection_options(jobs)
    jobs.add_argument("--state", choices=_JOB_STATES, help="only jobs in this state")
    jobs.add_argument("--study", help="only jobs of this Study Instance UID")
    jobs.add_argument("--limit", type=int, default=200, help="newest jobs shown (default 200)")
    jobs.set_defaults(handler=_cmd_jobs_list)
    actions = jobs.add_subparsers(dest="jobs_action", metavar="ACTION")

    keep = argparse.SUPPRESS  # options given before the action stay in force
    listing = actions.add_parser("list", help="Jobs, newest last (the default action).")
    listing.add_argument("--state", choices=_JOB_STATES, default=keep, help="only this state")
    listing.add_argument("--study", default=keep, help="only jobs of this Study Instance UID")
    listing.add_argument("--limit", type=int, default=keep, help="newest jobs shown (200)")
    add_connection_options(listing, nested=True)
    listing.set_defaults(handler=_cmd_jobs_list)

    show = actions.add_parser("show", help="One job: state, timings, results sent, history.")
    show.add_argument("job_id", type=int)
    add_connection_options(show, nested=True)
    show.set_defaults(handler=_cmd_jobs_show)

    retry = actions.add_parser(
        "retry",
        help="Run finished jobs again (failed, cancelled, skipped or succeeded); their results "
        "replace the earlier ones at PACS and the study report is sent again as a new version.",
    )
    retry.add_argument("job_ids", type=int, nargs="+")
    add_connection_options(retry, nested=True)
    retry.set_defaults(handler=_cmd_jobs_retry)

    cancel = actions.add_parser("cancel", help="Stop jobs that have not finished.")
    cancel.add_argument("job_ids", type=int, nargs="+")
    add_connection_options(cancel, nested=True)
    cancel.set_defaults(handler=_cmd_jobs_cancel)
