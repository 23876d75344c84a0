"""Train the per-fold new-lesion U-Nets for the leave-one-subject-out method comparison.

Per variant (input channel set of task new_lesions), with the shipped recipe
`models.reproduce.PLANS["new_lesions"]`:

1. pre-train on synthetic lesion pairs (its pre-training settings, seed 0);
2. for each held-out subject of open_ms_data longitudinal (patients 01, 03, 19), fine-tune that
   model with its fine-tuning recipe on the real cases of the other two subjects.

Order: per variant, pre-training then the folds of the first fine-tuning seed; after every
variant, the folds of the remaining seeds. Output (``--out``, default build/new_lesion_folds)::

    <variant>/pretrained.pt                     + pretrained.card.json
    <variant>/ft_seed<k>/heldout_<patientNN>.pt + heldout_<patientNN>.card.json
    <variant>/timings.json                      wall seconds per stage (summed over resumes)
    <variant>/work/...                          checkpoints and training logs

Resumable: finished files are skipped, interrupted stages resume from their checkpoints.
Scoring is not done here (another script runs the whole pipeline on the raw images).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/train_new_lesion_folds.py \\
        [--variants subtraction,two_channel] [--finetune-seeds 0,1] [--steps-factor 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import SimpleITK as sitk
import torch

from lesionwatch.models.datasets import CaseSet, default_data_root, real_case_set
from lesionwatch.models.finetune import finetune
from lesionwatch.models.reproduce import PLANS, ReproducePlan, _synthetic
from lesionwatch.models.train import TrainResult, train
from lesionwatch.models.weights import card_path_for, load_model
from lesionwatch.pipelines.channels import TASK_CHANNELS

__all__ = ["HELD_OUT", "VARIANTS", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
VARIANTS: dict[str, tuple[str, ...]] = {
    "subtraction": TASK_CHANNELS["new_lesions"],
    "two_channel": ("prior_flair_registered", "current_flair"),
}
HELD_OUT = ("patient01", "patient03", "patient19")


def log(message: str) -> None:
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}", flush=True)


def variant_plan(variant: str, steps_factor: float) -> ReproducePlan:
    plan = PLANS["new_lesions"].scaled(steps_factor).with_channels(VARIANTS[variant])
    quiet = {"cpu_threads": 1, "progress": False}  # neither enters the checkpoint fingerprint
    assert plan.finetune is not None
    return plan.model_copy(
        update={
            "pretrain": plan.pretrain.model_copy(update=quiet),
            "finetune": plan.finetune.model_copy(update=quiet),
        }
    )


def check_plan(variant_dir: Path, plan: ReproducePlan) -> None:
    """Refuse to mix files of another recipe (e.g. a smoke run's) into ``variant_dir``."""
    path = variant_dir / "plan.json"
    current = plan.model_dump(mode="json")
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) != current:
        sys.exit(f"{path} holds another recipe (other --steps-factor?); use another --out")
    variant_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")


@contextmanager
def timed(variant_dir: Path, stage: str) -> Iterator[None]:
    """Add the stage's wall seconds to ``timings.json`` (also when it is interrupted)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        path = variant_dir / "timings.json"
        timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 1)
        path.write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")


def progress(label: str, total: int, every: int) -> Callable[[int, float], None]:
    last = {"step": -1, "time": time.perf_counter(), "loss": 0.0}

    def on_step(step: int, loss: float) -> None:
        if last["step"] < 0:  # first step of this process (a resume starts mid-way)
            last["step"] = step - 1
        last["loss"] += loss
        if step % every == 0 or step == total:
            now, steps = time.perf_counter(), step - last["step"]
            log(
                f"{label} step {step}/{total} loss {last['loss'] / steps:.4f} "
                f"{(now - last['time']) / steps:.2f} s/step"
            )
            last.update(step=step, time=now, loss=0.0)

    return on_step


def publish(result: TrainResult, target: Path, channels: tuple[str, ...]) -> None:
    """Copy weights + card to ``target`` (card first: a weight file there means finished)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for source, dest in (
        (card_path_for(result.weights_path), card_path_for(target)),
        (result.weights_path, target),
    ):
        shutil.copyfile(source, dest.with_name(dest.name + ".writing"))
        os.replace(dest.with_name(dest.name + ".writing"), dest)
    load_model(target, "new_lesions", channels)  # as the weights loader will see it
    log(f"wrote {target} ({result.seconds:.0f} s training, loadable)")


def pretrain(variant: str, plan: ReproducePlan, out: Path, data_root: Path, every: int) -> Path:
    target = out / variant / "pretrained.pt"
    if target.is_file():
        log(f"{variant}: {target} exists, skipped")
        return target
    log(f"{variant}: pre-training {plan.pretrain.steps} steps on {plan.synthetic_cases} cases")
    with timed(out / variant, "pretrain"):
        synthetic = _synthetic(plan, data_root, plan.synthetic_cases, plan.synthetic_seed)
        result = train(
            plan.pretrain,
            synthetic,
            out / variant / "work" / "pretrain",
            resume=True,
            on_step=progress(f"{variant} pretrain", plan.pretrain.steps, every),
        )
    publish(result, target, VARIANTS[variant])
    return target


def finetune_fold(
    variant: str,
    plan: ReproducePlan,
    real: CaseSet,
    held: str,
    seed: int,
    out: Path,
    every: int,
) -> None:
    stage = f"ft_seed{seed}/heldout_{held}"
    target = out / variant / f"{stage}.pt"
    if target.is_file():
        log(f"{variant}: {target} exists, skipped")
        return
    rest = [i for i, subject in enumerate(real.subjects) if subject.split("/")[-1] != held]
    if len(rest) != len(real) - 1:
        sys.exit(f"held-out subject {held} is not exactly one of {real.subjects}")
    assert plan.finetune is not None
    settings = plan.finetune.model_copy(update={"seed": seed, "name": f"heldout_{held}"})
    log(f"{variant}: fine-tuning {stage} ({settings.steps} steps, cases {rest})")
    with timed(out / variant, stage):
        result = finetune(
            out / variant / "pretrained.pt",
            real.subset(rest),
            out / variant / "work" / stage,
            settings,
            resume=True,
            on_step=progress(f"{variant} {stage}", settings.steps, every),
        )
    publish(result, target, VARIANTS[variant])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--finetune-seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "new_lesion_folds")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--steps-factor", type=float, default=1.0, help="e.g. 0.02: smoke run")
    parser.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.finetune_seeds.split(",") if s]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; use {list(VARIANTS)}")
    if not seeds:
        parser.error("name at least one fine-tuning seed")

    torch.set_num_threads(1)  # the CPUs are shared
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    plans = {v: variant_plan(v, args.steps_factor) for v in variants}
    for variant, plan in plans.items():
        check_plan(args.out / variant, plan)
    log(
        f"variants {variants}, fine-tuning seeds {seeds}, steps x{args.steps_factor}, "
        f"out {args.out}, data {args.data_root}"
    )
    real: dict[str, CaseSet] = {}  # one per variant, so each real case is built once

    def folds(variant: str, seed: int) -> None:
        if variant not in real:
            real[variant] = real_case_set("new_lesions", args.data_root, channels=VARIANTS[variant])
        for held in HELD_OUT:
            finetune_fold(
                variant, plans[variant], real[variant], held, seed, args.out, args.log_every
            )

    for variant in variants:
        pretrain(variant, plans[variant], args.out, args.data_root, args.log_every)
        folds(variant, seeds[0])
    for seed in seeds[1:]:
        for variant in variants:
            folds(variant, seed)
    log("all done")


if __name__ == "__main__":
    main()
