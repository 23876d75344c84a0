"""`lesionwatch train | finetune | evaluate`: command-line wiring of models.train etc."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_training_commands"]

_TASKS = ["flair", "new_lesions", "enhancing"]


# `channels`: those of the model the cases are for (a card's); None: the task's default.
Channels = tuple[str, ...] | None


def _synthetic_set(args: argparse.Namespace, task: str, channels: Channels = None) -> Any:
    from lesionwatch.models.datasets import synthetic_brains, synthetic_case_set

    datasets = args.datasets.split(",") if args.datasets else None
    brains = synthetic_brains(task, args.data_root, datasets=datasets)
    return synthetic_case_set(task, brains, args.synthetic, args.synthetic_seed, channels=channels)


def _real_set(args: argparse.Namespace, task: str, channels: Channels = None) -> Any:
    from lesionwatch.models.datasets import real_case_set

    datasets = args.datasets.split(",") if args.datasets else None
    return real_case_set(task, args.data_root, datasets, channels=channels)


def _case_set(args: argparse.Namespace, task: str, channels: Channels = None) -> Any:
    from lesionwatch.models.datasets import CaseSet

    parts = []
    if args.synthetic:
        parts.append(_synthetic_set(args, task, channels))
    if args.real or not args.synthetic:
        parts.append(_real_set(args, task, channels))
    return parts[0] if len(parts) == 1 else CaseSet.concat(parts)


def _optimisation(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "patch_size_mm": args.patch_mm,
        "learning_rate": args.lr,
        "loss": args.loss,
        "lesion_fraction": args.lesion_fraction,
        "lesion_balance": args.lesion_balance,
        "seed": args.seed,
        "device": args.device,
        "cpu_threads": args.cpu_threads,
        "checkpoint_every": args.checkpoint_every,
        "version": args.version,
        "balance_subjects": args.balance_subjects or None,
    }
    if args.no_augment:
        values["augmentation"] = {"enabled": False}
    return {k: v for k, v in values.items() if v is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from lesionwatch.models.train import TrainSettings, train

    settings = TrainSettings(
        task=args.task,
        **{
            k: v
            for k, v in {"depth": args.depth, "base_width": args.base_width}.items()
            if v is not None
        },
        **_optimisation(args),
    )
    result = train(settings, _case_set(args, args.task), args.out, resume=args.resume)
    print(
        f"wrote {result.weights_path} after {result.steps_done} steps "
        f"({result.seconds / 60:.1f} min)"
    )
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from lesionwatch.models.finetune import FinetuneSettings, finetune
    from lesionwatch.models.weights import read_card

    card = read_card(args.from_weights)
    task, channels = card.task, tuple(card.architecture.channels)
    extra: dict[str, Any] = (
        {"freeze_encoder_steps": args.freeze_encoder_steps}
        if args.freeze_encoder_steps is not None
        else {}
    )
    if args.rehearsal_fraction:
        if not args.synthetic:
            raise SystemExit("--rehearsal-fraction needs --synthetic N cases to rehearse")
        extra["rehearsal_fraction"] = args.rehearsal_fraction
        cases = _real_set(args, task, channels)
        rehearsal = _synthetic_set(args, task, channels)
    else:
        cases, rehearsal = _case_set(args, task, channels), None
    settings = FinetuneSettings(**_optimisation(args), **extra)
    result = finetune(
        args.from_weights,
        cases,
        args.out,
        settings,
        resume=args.resume,
        rehearsal=rehearsal,
    )
    print(
        f"wrote {result.weights_path} after {result.steps_done} steps "
        f"({result.seconds / 60:.1f} min)"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from lesionwatch.models.evaluate import EvaluateSettings, evaluate, record_metrics_in_card
    from lesionwatch.models.weights import read_card

    card = read_card(args.weights)
    task, channels = card.task, tuple(card.architecture.channels)
    settings = EvaluateSettings(
        **{
            k: v
            for k, v in {
                "threshold": args.threshold,
                "step_mm": args.step_mm,
                "device": args.device,
            }.items()
            if v
        }
    )
    report = evaluate(args.weights, _case_set(args, task, channels), settings, task=task)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    if args.record_in_card is not None:
        record_metrics_in_card(args.weights, report, prefix=args.record_in_card)
        print(f"metrics recorded in the card of {args.weights}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from lesionwatch.models.reproduce import PLANS, install_weights, reproduce_task
    from lesionwatch.service.segment_command import DEFAULT_WEIGHTS_DIR

    tasks = args.tasks.split(",")
    unknown = [task for task in tasks if task not in PLANS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; use {sorted(PLANS)}")
    for task in tasks:
        plan = PLANS[task].scaled(args.scale) if args.scale != 1.0 else PLANS[task]
        if args.device or args.cpu_threads:
            extra = {
                k: v
                for k, v in {"device": args.device, "cpu_threads": args.cpu_threads}.items()
                if v
            }
            plan = plan.model_copy(
                update={
                    "pretrain": plan.pretrain.model_copy(update=extra),
                    "finetune": plan.finetune.model_copy(update=extra) if plan.finetune else None,
                }
            )
        outcome = reproduce_task(plan, args.out, args.data_root)
        print(f"{task}: {outcome.weights} (results: {outcome.results_markdown})")
        if args.install:
            target = install_weights(outcome, args.weights_dir or DEFAULT_WEIGHTS_DIR)
            print(f"{task}: installed as {target}")
    return 0


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root", type=Path, help="labelled data (default: ../shared/data beside the checkout)"
    )
    parser.add_argument(
        "--datasets",
        help="comma-separated subset of open_ms_cross_sectional, open_ms_longitudinal, mslesseg",
    )
    parser.add_argument("--real", action="store_true", help="include the real labelled cases")
    parser.add_argument(
        "--synthetic", type=int, default=0, metavar="N", help="N synthetic cases from real brains"
    )
    parser.add_argument("--synthetic-seed", type=int, default=0)


def _optimisation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for checkpoints, weights and card"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch-mm", type=int)
    parser.add_argument("--lr", type=float, help="Adam learning rate (seed recipe: 1e-5)")
    parser.add_argument("--loss", choices=["ce", "dice_ce"])
    parser.add_argument("--lesion-fraction", type=float, help="share of patches centred on lesions")
    parser.add_argument(
        "--lesion-balance",
        type=float,
        help="share of lesion patches centred on a lesion drawn per lesion, not per voxel "
        "(small lesions as often as large plaques)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cpu-threads", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--version", help="version written into the model card")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument(
        "--balance-subjects",
        action="store_true",
        help="give every patient the same share of patches, however many visits it has",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )


def add_training_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = commands.add_parser(
        "train", help="Train a model from scratch (synthetic and/or real cases)."
    )
    train.add_argument("--task", choices=_TASKS, required=True)
    train.add_argument("--depth", type=int, choices=[3, 4, 5])
    train.add_argument("--base-width", type=int)
    _optimisation_options(train)
    _data_options(train)
    train.set_defaults(handler=_cmd_train)

    finetune = commands.add_parser(
        "finetune", help="Fine-tune weights on a site's labelled studies."
    )
    finetune.add_argument(
        "--from", dest="from_weights", type=Path, required=True, help="parent weight file"
    )
    finetune.add_argument("--freeze-encoder-steps", type=int)
    finetune.add_argument(
        "--rehearsal-fraction",
        type=float,
        help="share of patches from the --synthetic cases (guards against forgetting); "
        "the real cases give the rest",
    )
    _optimisation_options(finetune)
    _data_options(finetune)
    finetune.set_defaults(handler=_cmd_finetune)

    evaluate = commands.add_parser(
        "evaluate", help="Lesion-wise sensitivity/PPV/F1, Dice and volumes."
    )
    evaluate.add_argument("weights", type=Path)
    evaluate.add_argument("--threshold", type=float)
    evaluate.add_argument("--step-mm", type=int)
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--json", type=Path, help="also write the results as JSON")
    evaluate.add_argument(
        "--record-in-card", metavar="PREFIX", help="store the summary in the model card"
    )
    _data_options(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    reproduce = commands.add_parser(
        "reproduce-weights",
        help="Rebuild the shipped default weights: synthetic pre-training, leave-one-out "
        "comparison on the real data, final fine-tuning (resumable).",
    )
    reproduce.add_argument("--out", type=Path, required=True, help="working folder (resumable)")
    reproduce.add_argument("--tasks", default="flair,new_lesions,enhancing")
    reproduce.add_argument(
        "--data-root", type=Path, help="labelled data (default: ../shared/data beside the checkout)"
    )
    reproduce.add_argument(
        "--scale", type=float, default=1.0, help="multiply every step budget (GPU: 10)"
    )
    reproduce.add_argument("--device", choices=["auto", "cpu", "cuda"])
    reproduce.add_argument("--cpu-threads", type=int)
    reproduce.add_argument(
        "--install", action="store_true", help="copy the results into models/weights/"
    )
    reproduce.add_argument("--weights-dir", type=Path, help="install here instead")
    reproduce.set_defaults(handler=_cmd_reproduce)
