"""The `lesionwatch` command line. Config is loaded here, once, and handed to constructors."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lesionwatch.config import ConfigError, LesionWatchConfig, load_config

from .logging_setup import configure_logging
from .text_table import format_table

if TYPE_CHECKING:
    from .segment_command import SegmentOutputs

__all__ = ["main"]

log = logging.getLogger("lesionwatch")


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> LesionWatchConfig:
    file = args.config or (
        Path(os.environ["LESIONWATCH_CONFIG"]) if os.environ.get("LESIONWATCH_CONFIG") else None
    )
    return load_config(file, overrides=overrides)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML config file (default: $LESIONWATCH_CONFIG, else built-in embedded defaults)",
    )


# --- commands -------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import ListenerService

    config = _load(
        args,
        {
            "listener.port": args.port,
            "listener.ae_title": args.ae_title,
            "storage.data_dir": str(args.data_dir) if args.data_dir else None,
            "database.url": args.database,
        },
    )
    configure_logging(config.log_level)
    service = ListenerService(config)
    service.start()

    def _shutdown(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    service.wait()
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    if args.show:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from lesionwatch.dicom_io.classify import classify_directory
    from lesionwatch.dicom_io.classify import format_table as format_classification

    config = _load(args)
    if not args.directory.is_dir():
        raise CommandError(f"{args.directory} is not a directory")
    rows = classify_directory(args.directory, config.classification)
    if not rows:
        raise CommandError(f"no DICOM series found under {args.directory}")
    print(format_classification(rows))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from lesionwatch.dicom_io.convert import convert_series
    from lesionwatch.dicom_io.series_errors import DicomSeriesError

    try:
        volume = convert_series(args.series_dir, args.output, series_instance_uid=args.series_uid)
    except (DicomSeriesError, FileNotFoundError, NotADirectoryError) as exc:
        raise CommandError(str(exc)) from exc
    i, j, k = volume.shape_ijk
    spacing = " x ".join(f"{s:.4g}" for s in volume.spacing_mm)
    print(f"wrote {args.output}: {i} x {j} x {k} voxels, spacing {spacing} mm")
    return 0


def _cmd_studies(args: argparse.Namespace) -> int:
    from .db.models import StudyState
    from .queries import list_studies
    from .server import open_database

    engine, sessions = open_database(_load(args))
    with sessions() as session:
        studies = list_studies(session, StudyState(args.state) if args.state else None)
    engine.dispose()
    rows = [
        (
            s.study_instance_uid,
            s.patient_id,
            s.study_date,
            len(s.series),
            s.instances,
            s.state,
            s.reason,
        )
        for s in studies
    ]
    print(
        format_table(
            ["study", "patient", "date", "series", "instances", "state", "reason"], rows, 70
        )
    )
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .db.models import JobState
    from .queries import list_jobs
    from .server import open_database

    engine, sessions = open_database(_load(args))
    with sessions() as session:
        jobs = list_jobs(session, JobState(args.state) if args.state else None)
    engine.dispose()
    rows = [
        (j.job_id, j.study_instance_uid, j.pipeline, j.generation, j.state, j.attempt, j.reason)
        for j in jobs
    ]
    print(
        format_table(
            ["job", "study", "pipeline", "generation", "state", "attempt", "reason"], rows, 70
        )
    )
    return 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from .server import open_database

    config = _load(args, {"database.url": args.database})
    engine, _ = open_database(config)
    engine.dispose()
    print("database schema is at the newest revision")
    return 0


def _cmd_send_test(args: argparse.Namespace) -> int:
    from .send_test import check_destination, format_report

    config = _load(args)
    by_name = {d.name: d for d in config.destinations}
    if args.destination not in by_name:
        known = ", ".join(sorted(by_name)) or "none configured"
        raise CommandError(
            f"no destination named {args.destination!r} in the config (known: {known})"
        )
    report = check_destination(by_name[args.destination])
    print(format_report(report))
    return 0 if report.ok else 1


def _cmd_dispatcher(args: argparse.Namespace) -> int:
    import threading

    from .dispatcher import Dispatcher
    from .server import open_database

    config = _load(args)
    configure_logging(config.log_level)
    if not config.destinations:
        raise CommandError(
            "no destinations configured: add a `destinations:` section to the config"
        )
    engine, sessions = open_database(config)
    stop = threading.Event()

    def _shutdown(signum: int, _frame: object) -> None:
        log.info(
            "received %s, dispatcher stopping after the current batch", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    try:
        Dispatcher(
            sessions, config.destinations, config.delivery, base_dir=config.storage.data_dir
        ).run_forever(stop)
    finally:
        engine.dispose()
    return 0


def _run_segment(
    args: argparse.Namespace, run: Callable[[LesionWatchConfig], SegmentOutputs]
) -> int:
    """Load the config, run one `segment` command, turn known failures into CommandError,
    and print what was written, the lesion count and volume, and the time per step."""
    from lesionwatch.dicom_io.series_errors import DicomSeriesError
    from lesionwatch.models.weights import ModelCardMismatchError, WeightsIntegrityError
    from lesionwatch.pipelines.steps.brain_mask import BrainMaskError
    from lesionwatch.pipelines.steps.registration import RegistrationError

    from .segment_command import SegmentInputError

    config = _load(args)
    configure_logging(config.log_level)
    try:
        outputs = run(config)
    except (
        SegmentInputError,
        DicomSeriesError,
        ModelCardMismatchError,
        WeightsIntegrityError,
        BrainMaskError,
        RegistrationError,
    ) as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"wrote {outputs.mask_path}: {outputs.lesion_count} lesions, "
        f"{outputs.total_volume_ml:.2f} mL"
    )
    if args.table:
        print(f"wrote {args.table}")
    for path in outputs.dicom_files:
        print(f"wrote {path}")
    print("time per step: " + ", ".join(f"{k} {v:.1f} s" for k, v in outputs.timings_s.items()))
    return 0


def _cmd_segment_flair(args: argparse.Namespace) -> int:
    from .segment_command import segment_flair

    return _run_segment(
        args,
        lambda config: segment_flair(
            config,
            args.flair,
            args.out,
            t1_source=args.t1,
            table_csv=args.table,
            weights=args.weights,
            dicom_out=args.dicom_out,
        ),
    )


def _cmd_segment_new_lesions(args: argparse.Namespace) -> int:
    from .segment_command import segment_new_lesions

    return _run_segment(
        args,
        lambda config: segment_new_lesions(
            config, args.prior, args.current, args.out, table_csv=args.table, weights=args.weights
        ),
    )


def _cmd_segment_enhancing(args: argparse.Namespace) -> int:
    from .segment_command import segment_enhancing

    return _run_segment(
        args,
        lambda config: segment_enhancing(
            config, args.t1, args.t1_post, args.out, table_csv=args.table, weights=args.weights
        ),
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    configure_logging("WARNING")
    return run_demo(workdir=args.workdir, keep=args.keep)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lesionwatch")
    except PackageNotFoundError:
        return "unknown (not installed)"


# --- parser ---------------------------------------------------------------------------------


def _add_segment_common(parser: argparse.ArgumentParser, pipeline: str) -> None:
    parser.add_argument("--table", type=Path, help="lesion table as CSV")
    parser.add_argument(
        "--weights",
        type=Path,
        help=f"weight file (default: pipelines.{pipeline}.weights, else shipped)",
    )
    _add_config_option(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionwatch",
        description="DICOM worker for MS brain MRI: FLAIR, new and enhancing lesion segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"lesionwatch {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", _cmd_serve, "Run the DICOM listener and study assembler.")
    _add_config_option(serve)
    serve.add_argument("--port", type=int, help="listener port (listener.port)")
    serve.add_argument("--ae-title", help="listener AE title (listener.ae_title)")
    serve.add_argument(
        "--data-dir", type=Path, help="archive and embedded database (storage.data_dir)"
    )
    serve.add_argument("--database", help="SQLAlchemy database URL (database.url)")

    config_cmd = commands.add_parser("config", help="Check a config file.")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check", help="Validate FILE and print every error with its location."
    )
    check.add_argument("file", type=Path)
    check.add_argument("--show", action="store_true", help="print the effective config when valid")
    check.set_defaults(handler=_cmd_config_check)

    classify = command(
        "classify", _cmd_classify, "Classify the DICOM series in a folder (FLAIR, T1, ...)."
    )
    classify.add_argument("directory", type=Path)
    _add_config_option(classify)

    convert = command(
        "convert", _cmd_convert, "Convert a DICOM series to NIfTI with exact geometry."
    )
    convert.add_argument("series_dir", type=Path)
    convert.add_argument("output", type=Path, help="output file, e.g. out.nii.gz")
    convert.add_argument(
        "--series-uid", help="SeriesInstanceUID when the folder holds several series"
    )

    studies = command("studies", _cmd_studies, "List received studies and their state.")
    studies.add_argument("--state", choices=["receiving", "ready", "incomplete"])
    _add_config_option(studies)

    jobs = command("jobs", _cmd_jobs, "List jobs created by study assembly.")
    jobs.add_argument(
        "--state", choices=["pending", "running", "succeeded", "failed", "superseded"]
    )
    _add_config_option(jobs)

    db = commands.add_parser("db", help="Database maintenance.")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser(
        "upgrade", help="Apply Alembic migrations up to the newest revision."
    )
    _add_config_option(upgrade)
    upgrade.add_argument("--database", help="SQLAlchemy database URL (database.url)")
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    segment = commands.add_parser("segment", help="Run a pipeline offline on one case.")
    segment_sub = segment.add_subparsers(dest="pipeline", required=True, metavar="PIPELINE")
    flair = segment_sub.add_parser("flair", help="FLAIR lesions at one time point.")
    flair.add_argument(
        "--flair", type=Path, required=True, help="FLAIR as NIfTI file or DICOM series folder"
    )
    flair.add_argument(
        "--t1", type=Path, help="T1 of the same study (used when the model takes it)"
    )
    flair.add_argument(
        "--out", type=Path, required=True, help="lesion mask on the FLAIR's own grid (.nii.gz)"
    )
    flair.add_argument("--table", type=Path, help="lesion table as CSV")
    flair.add_argument(
        "--weights", type=Path, help="weight file (default: pipelines.flair.weights, else shipped)"
    )
    flair.add_argument(
        "--dicom-out", type=Path, help="also write SEG, SR and fallback objects here (DICOM input)"
    )
    _add_config_option(flair)
    flair.set_defaults(handler=_cmd_segment_flair)

    new_lesions = segment_sub.add_parser(
        "new-lesions", help="Lesions new on the current FLAIR since the prior FLAIR."
    )
    new_lesions.add_argument(
        "--prior", type=Path, required=True, help="prior FLAIR (NIfTI file or DICOM series folder)"
    )
    new_lesions.add_argument(
        "--current", type=Path, required=True, help="current FLAIR (NIfTI or DICOM series folder)"
    )
    new_lesions.add_argument(
        "--out", type=Path, required=True, help="new-lesion mask on the current FLAIR's grid"
    )
    _add_segment_common(new_lesions, "new_lesions")
    new_lesions.set_defaults(handler=_cmd_segment_new_lesions)

    enhancing = segment_sub.add_parser(
        "enhancing", help="Gadolinium-enhancing lesions (T1 before and after contrast)."
    )
    enhancing.add_argument(
        "--t1", type=Path, required=True, help="T1 pre-contrast (NIfTI or DICOM series folder)"
    )
    enhancing.add_argument(
        "--t1-post", type=Path, required=True, help="T1 post-contrast, same study (NIfTI or DICOM)"
    )
    enhancing.add_argument(
        "--out", type=Path, required=True, help="enhancing-lesion mask on the T1-post grid"
    )
    _add_segment_common(enhancing, "enhancing")
    enhancing.set_defaults(handler=_cmd_segment_enhancing)

    from .training_commands import add_training_commands

    add_training_commands(commands)

    send_test = command(
        "send-test", _cmd_send_test, "Check a result destination: C-ECHO plus a test object."
    )
    send_test.add_argument("destination", help="name of a destination in the config")
    _add_config_option(send_test)

    dispatcher = command(
        "dispatcher", _cmd_dispatcher, "Deliver results to the configured destinations."
    )
    _add_config_option(dispatcher)

    demo = command(
        "demo", _cmd_demo, "Start the service on embedded defaults and send it a real MS study."
    )
    demo.add_argument("--workdir", type=Path, help="keep the demo's archive and database here")
    demo.add_argument("--keep", action="store_true", help="do not delete the temporary work folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"lesionwatch: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"lesionwatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
