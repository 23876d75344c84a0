"""The `lesionwatch` command line. Config is loaded here, once, and handed to constructors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lesionwatch.config import ConfigError, LesionWatchConfig, load_config

from .cli_support import CommandError, add_config_option, load_from_args
from .logging_setup import configure_logging
from .text_table import format_table

__all__ = ["main"]

log = logging.getLogger("lesionwatch")


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> LesionWatchConfig:
    return load_from_args(args, overrides)


_add_config_option = add_config_option


# --- commands -------------------------------------------------------------------------------


def _cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    from lesionwatch.pipelines.registry import config_problems

    problems = config_problems(config.pipelines)
    notes = [
        f"worker.queues {list(config.worker.queues)} do not include {where} queue {queue!r}: "
        "only workers started with `lesionwatch work --queue "
        f"{queue}` take those jobs"
        for where, queue in [
            *((f"pipelines.{name}", cfg.queue) for name, cfg in config.pipelines.enabled().items()),
            ("worker.report_queue", config.worker.report_queue),
        ]
        if queue not in config.worker.queues
    ]
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  {args.file}: {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    for note in notes:
        print(f"  note: {note}")
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

    engine, sessions = open_database(_load(args), existing=True)
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


def _segment_inputs(args: argparse.Namespace) -> tuple[str, dict[Any, Path], dict[Any, Path]]:
    """(pipeline, current series, prior series) named by a `segment` subcommand's options."""
    from lesionwatch.config.schema import SeriesClass

    if args.pipeline == "flair":
        current = {SeriesClass.FLAIR: args.flair}
        if args.t1 is not None:
            current[SeriesClass.T1_PRE] = args.t1
        return "flair", current, {}
    if args.pipeline == "new-lesions":
        return "new_lesions", {SeriesClass.FLAIR: args.current}, {SeriesClass.FLAIR: args.prior}
    current = {SeriesClass.T1_PRE: args.t1, SeriesClass.T1_POST: args.t1_post}
    if args.flair is not None:
        current[SeriesClass.FLAIR] = args.flair
    return "enhancing", current, {}


def _cmd_segment(args: argparse.Namespace) -> int:
    """Run one registry pipeline offline; print what was written, the lesion count and
    volume, and the time per step. Known input problems become a message, not a traceback."""
    from lesionwatch.dicom_io.series_errors import DicomSeriesError
    from lesionwatch.models.weights import ModelCardMismatchError, WeightsIntegrityError
    from lesionwatch.pipelines.steps.brain_mask import BrainMaskError
    from lesionwatch.pipelines.steps.registration import RegistrationError

    from .segment_command import SegmentInputError, segment

    config = _load(args)
    configure_logging(config.log_level)
    pipeline, current, prior = _segment_inputs(args)
    try:
        outputs = segment(
            config,
            pipeline,
            current,
            args.out,
            prior=prior,
            table_csv=args.table,
            weights=args.weights,
            dicom_out=args.dicom_out,
        )
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
    if outputs.review:
        print(f"plausibility check: {outputs.review}")
    if outputs.change:
        print(outputs.change)
    if args.table:
        print(f"wrote {args.table}")
    for path in outputs.dicom_files:
        print(f"wrote {path}")
    print("time per step: " + ", ".join(f"{k} {v:.1f} s" for k, v in outputs.timings_s.items()))
    return 0


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
    parser.add_argument(
        "--dicom-out", type=Path, help="also write SEG, SR and fallback objects here (DICOM input)"
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
    flair.set_defaults(handler=_cmd_segment)

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
    new_lesions.set_defaults(handler=_cmd_segment)

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
        "--flair",
        type=Path,
        help="FLAIR of the same study: candidates outside its lesions are removed (without it "
        "the result is unconfirmed)",
    )
    enhancing.add_argument(
        "--out", type=Path, required=True, help="enhancing-lesion mask on the T1-post grid"
    )
    _add_segment_common(enhancing, "enhancing")
    enhancing.set_defaults(handler=_cmd_segment)

    from .ops_commands import add_ops_commands
    from .process_commands import add_process_commands
    from .training_commands import add_training_commands

    add_process_commands(commands)
    add_ops_commands(commands)
    add_training_commands(commands)

    send_test = command(
        "send-test", _cmd_send_test, "Check a result destination: C-ECHO plus a test object."
    )
    send_test.add_argument("destination", help="name of a destination in the config")
    _add_config_option(send_test)

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
    except Exception as exc:
        message = _unavailable_service(exc)
        if message is None:
            raise
        print(f"lesionwatch: {message}", file=sys.stderr)
        return 3


def _unavailable_service(exc: BaseException) -> str | None:
    """A plain sentence when the database or the broker cannot be reached, else None."""
    from sqlalchemy.exc import OperationalError

    from .broker import BrokerUnavailableError
    from .server import DatabaseMissingError

    if isinstance(exc, DatabaseMissingError):
        return str(exc)
    if isinstance(exc, OperationalError):
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        return (
            f"cannot use the database: {reason} (check database.url / --database, and "
            "that the server runs)"
        )
    if isinstance(exc, BrokerUnavailableError):
        return f"cannot reach the broker: {exc} (check broker.url / --broker)"
    return None


if __name__ == "__main__":
    sys.exit(main())
