"""Train, resume, fine-tune and evaluate a tiny network on synthetic lesions in a real brain.

The brain is a 64 mm cube of open_ms_data patient07 (its real lesions inpainted, synthetic
ones painted in); the network has depth 3, base width 4, 32 mm patches; one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.datasets import (
    TASK_CHANNELS,
    BrainImages,
    CaseSet,
    DatasetError,
    crop_volume,
    find_real_cases,
    load_real_case,
    synthetic_case_set,
)
from lesionwatch.models.evaluate import (
    EvaluateSettings,
    LoocvReport,
    LoocvSettings,
    evaluate,
    loocv,
    record_metrics_in_card,
)
from lesionwatch.models.finetune import FinetuneSettings, finetune
from lesionwatch.models.synthetic_lesions import LesionModel
from lesionwatch.models.train import TrainingError, TrainSettings, compute_loss, train
from lesionwatch.models.unet3d import UNet3D
from lesionwatch.models.weights import (
    ModelCardMismatchError,
    card_path_for,
    file_sha256,
    load_model,
    load_task_model,
)

STEPS = 8
SETTINGS = TrainSettings(
    task="flair",
    depth=3,
    base_width=4,
    patch_size_mm=32,
    batch_size=2,
    steps=STEPS,
    learning_rate=3e-3,
    checkpoint_every=4,
    pool_size=2,
    pool_refresh_steps=4,
    device="cpu",
    cpu_threads=1,
    progress=False,
    version="smoke",
)


MODEL = LesionModel(max_volume_mm3=500.0, count_range=(8, 12))


@pytest.fixture(scope="module")
def brain(test_data: Path) -> BrainImages:
    folder = test_data / "open_ms_data" / "cross_sectional" / "patient07"
    volumes = {
        name: ImageVolume.load(folder / f"{name}.nii.gz")
        for name in ("FLAIR", "T1", "T1POST", "lesion_mask")
    }
    centre = np.round(ndimage.center_of_mass(volumes["FLAIR"].array > 0)).astype(int)
    box = tuple(slice(int(c) - 32, int(c) + 32) for c in centre)
    cubes = {name: crop_volume(volume, box) for name, volume in volumes.items()}
    floats = {name: cube.with_array(cube.array.astype(np.float32)) for name, cube in cubes.items()}
    return BrainImages(
        "patient07",
        floats["FLAIR"],
        t1=floats["T1"],
        t1_post=floats["T1POST"],
        lesions=cubes["lesion_mask"],
        source="open_ms_data patient07, 64 mm cube",
    )


@pytest.fixture(scope="module")
def cases(brain: BrainImages) -> CaseSet:
    return synthetic_case_set("flair", [brain], 3, seed=0, lesion_model=MODEL)


@pytest.fixture(scope="module")
def full_run(cases: CaseSet, tmp_path_factory: pytest.TempPathFactory):
    return train(SETTINGS, cases, tmp_path_factory.mktemp("full"))


def test_synthetic_cases_are_deterministic_and_labelled(brain: BrainImages, cases: CaseSet):
    case = cases.load(1)
    assert case.image.shape == (1, 64, 64, 64) and case.label.any()
    assert abs(float(case.image[0][case.brain].mean())) < 1e-3  # z-scored in the brain
    assert float(case.image[0][case.label > 0].mean()) > 1.0  # lesions are bright
    rebuilt = synthetic_case_set("flair", [brain], 3, seed=0, lesion_model=MODEL).load(1)
    assert np.array_equal(rebuilt.image, case.image) and np.array_equal(rebuilt.label, case.label)
    other = synthetic_case_set("flair", [brain], 3, seed=1, lesion_model=MODEL).load(1)
    assert not np.array_equal(other.label, case.label)
    joined = CaseSet.concat([cases.subset([2]), cases.subset([1])])
    assert joined.case_ids == (cases.case_ids[2], cases.case_ids[1])
    assert joined.load(1) is case  # served from the parent's cache


@pytest.mark.parametrize("task", ["new_lesions", "enhancing"])
def test_synthetic_cases_of_the_other_tasks(brain: BrainImages, task: str):
    case = synthetic_case_set(task, [brain], 1, seed=4, lesion_model=MODEL).load(0)
    assert case.channels == TASK_CHANNELS[task] and case.image.shape == (3, 64, 64, 64)
    assert case.label.any()
    lesion = case.label > 0
    first, second, difference = case.image
    assert np.allclose(difference, (second - first) * case.brain, atol=1e-5)
    # new lesions are bright only in the current FLAIR; enhancement only after contrast
    assert float(difference[lesion].mean()) > 0.5 + float(difference[case.brain].mean())


TWO_CHANNEL = ("prior_flair_registered", "current_flair")


def test_new_lesions_two_channel_recipe_trains_fine_tunes_and_evaluates(
    brain: BrainImages, tmp_path: Path
):
    """A new_lesions recipe without the difference channel: the same synthetic pairs minus
    that channel, a 2-channel network, cards naming the set, and no 3-channel case mixed in."""
    from lesionwatch.models.reproduce import PLANS, _scratch_settings

    two = synthetic_case_set(
        "new_lesions", [brain], 2, seed=4, lesion_model=MODEL, channels=TWO_CHANNEL
    )
    three = synthetic_case_set("new_lesions", [brain], 2, seed=4, lesion_model=MODEL)
    case, full = two.load(0), three.load(0)
    assert case.channels == TWO_CHANNEL and np.array_equal(case.image, full.image[:2])
    assert np.array_equal(case.label, full.label) and "input channels" in two.description
    settings = TrainSettings(
        **{**SETTINGS.model_dump(), "task": "new_lesions", "channels": TWO_CHANNEL, "steps": 2}
    )
    pretrained = train(settings, two, tmp_path / "pretrain")
    assert pretrained.card.architecture.channels == TWO_CHANNEL
    assert pretrained.card.architecture.in_channels == 2
    model, _ = load_task_model(pretrained.weights_path, "new_lesions")
    assert model.in_channels == 2
    with pytest.raises(ModelCardMismatchError, match="input channels"):
        load_model(pretrained.weights_path, "new_lesions", TASK_CHANNELS["new_lesions"])
    tune = FinetuneSettings(
        **settings.model_dump(exclude={"task", "channels", "depth", "base_width", "dilation"})
    ).model_copy(update={"steps": 1})
    tuned = finetune(pretrained.weights_path, two.subset([1]), tmp_path / "tuned", tune)
    assert tuned.card.architecture.channels == TWO_CHANNEL
    with pytest.raises(TrainingError, match="carries channels"):
        finetune(pretrained.weights_path, three.subset([1]), tmp_path / "mixed", tune)
    scores = EvaluateSettings(device="cpu", cpu_threads=1, step_mm=32, progress=False)
    assert len(evaluate(tuned.weights_path, two.subset([0]), scores).cases) == 1
    with pytest.raises(ValidationError, match="cannot take channels"):
        TrainSettings(task="flair", channels=TWO_CHANNEL)
    plan = PLANS["new_lesions"].with_channels(TWO_CHANNEL)
    assert plan.pretrain.input_channels == _scratch_settings(plan).input_channels == TWO_CHANNEL
    assert PLANS["new_lesions"].pretrain.input_channels == TASK_CHANNELS["new_lesions"]


def test_real_cases_are_found_under_a_data_root(test_data: Path):
    specs = find_real_cases("flair", test_data)
    assert [s.case_id for s in specs] == ["open_ms_data/cross_sectional/patient07"]
    case = load_real_case(specs[0], "flair")
    assert case.image.shape == (1, 182, 218, 182) and int(case.label.sum()) > 1000
    longitudinal = find_real_cases("new_lesions", test_data)
    assert [s.case_id for s in longitudinal] == ["open_ms_data/longitudinal/patient01"]
    with pytest.raises(DatasetError, match="no real enhancing"):
        find_real_cases("enhancing", test_data)
    with pytest.raises(DatasetError, match="does not exist"):
        find_real_cases("flair", test_data / "missing")


def test_training_changes_weights_and_lowers_the_loss(full_run, cases: CaseSet):
    assert len(full_run.losses) == STEPS
    trained, card = load_model(full_run.weights_path, "flair", ["flair"])
    torch.manual_seed(SETTINGS.seed)
    initial = UNet3D(1, 2, depth=3, base_width=4)
    changed = [
        name
        for name, value in trained.state_dict().items()
        if value.dtype.is_floating_point and not torch.equal(value, initial.state_dict()[name])
    ]
    assert len(changed) > 10
    # loss on a fixed batch (train-mode BatchNorm, as in training): lower after training
    case = cases.load(0)
    lesion = np.argwhere(case.label > 0)[0]
    start = np.clip(lesion - 16, 0, 32)
    box = tuple(slice(int(s), int(s) + 32) for s in start)
    x = torch.from_numpy(case.image[(slice(None), *box)][None].copy()).repeat(2, 1, 1, 1, 1)
    y = torch.from_numpy(case.label[box].astype(np.int64))[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        before = compute_loss(initial.train()(x), y, "ce")
        after = compute_loss(trained.train()(x), y, "ce")
    assert float(after) < float(before)
    assert "Adam lr 0.003" in card.recipe and "synthetic flair cases" in card.training_data
    assert card.patch_size_mm == 32 and card.sha256 == file_sha256(full_run.weights_path)


def test_resume_reproduces_the_uninterrupted_run(full_run, cases: CaseSet, tmp_path: Path):
    half = SETTINGS.model_copy(update={"steps": STEPS // 2})
    first = train(half, cases, tmp_path)
    assert first.resumed_from_step is None and len(first.losses) == STEPS // 2
    resumed = train(SETTINGS, cases, tmp_path, resume=True)
    assert resumed.resumed_from_step == STEPS // 2
    assert resumed.losses == full_run.losses
    log = (tmp_path / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, STEPS + 1))
    a = torch.load(full_run.weights_path, weights_only=True)
    b = torch.load(resumed.weights_path, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a changed recipe refuses to resume from this folder, a fresh run refuses to mix in
    with pytest.raises(TrainingError, match="learning_rate"):
        train(SETTINGS.model_copy(update={"learning_rate": 1e-4}), cases, tmp_path, resume=True)
    with pytest.raises(TrainingError, match="earlier run"):
        train(SETTINGS, cases, tmp_path)


def test_finetune_records_parent_and_freezes_encoder(full_run, cases: CaseSet, tmp_path: Path):
    settings = FinetuneSettings(
        **SETTINGS.model_dump(
            exclude={"task", "channels", "depth", "base_width", "dilation", "steps"}
        ),
        steps=1,
        freeze_encoder_steps=1,
    )
    result = finetune(full_run.weights_path, cases.subset([2]), tmp_path, settings)
    parent = torch.load(full_run.weights_path, weights_only=True)
    child = torch.load(result.weights_path, weights_only=True)
    encoder = [k for k in parent if k.startswith(("stem.", "down."))]
    decoder = [k for k in parent if k.startswith(("up.", "head.", "classifier."))]
    assert all(torch.equal(parent[k], child[k]) for k in encoder)  # weights and BN stats
    assert any(not torch.equal(parent[k], child[k]) for k in decoder)
    assert full_run.card.sha256 in result.card.recipe
    assert "fine-tuning:" in result.card.training_data
    load_model(result.weights_path, "flair", ["flair"])


def test_finetune_rehearses_pretraining_cases_in_the_asked_share(
    full_run, cases: CaseSet, tmp_path: Path
):
    """Half the fine-tuning patches come from the rehearsal set, the rest from the real cases;
    the card says so, and asking for rehearsal without cases is refused."""
    settings = FinetuneSettings(
        **SETTINGS.model_dump(
            exclude={
                "task",
                "channels",
                "depth",
                "base_width",
                "dilation",
                "steps",
                "balance_subjects",
            }
        ),
        steps=12,
        rehearsal_fraction=0.5,
        balance_subjects=True,
    )
    site, rehearsal = cases.subset([2]), cases.subset([0, 1])
    result = finetune(full_run.weights_path, site, tmp_path, settings, rehearsal=rehearsal)
    assert "rehearsal, 50% of patches" in result.card.training_data
    assert "each subject an equal share" in result.card.recipe
    log = [json.loads(line) for line in (tmp_path / "training_log.jsonl").read_text().splitlines()]
    assert len(log) == 12
    drawn = [case_id for record in log for case_id in record["cases"]]
    from_site = drawn.count(site.case_ids[0])
    assert 0 < from_site < len(drawn) and set(drawn) <= {*site.case_ids, *rehearsal.case_ids}
    with pytest.raises(TrainingError, match="rehearsal"):
        finetune(full_run.weights_path, site, tmp_path / "again", settings)


def test_evaluate_reports_per_case_and_mean_se(full_run, cases: CaseSet, tmp_path: Path):
    settings = EvaluateSettings(device="cpu", cpu_threads=1, step_mm=32, progress=False)
    report = evaluate(full_run.weights_path, cases.subset([0, 1]), settings)
    assert [c.case_id for c in report.cases] == list(cases.case_ids[:2])
    assert all(c.true_volume_ml > 0 for c in report.cases)
    table = report.table()
    assert "mean ± SE" in table and cases.case_ids[0] in table and "F1 (Anima)" in table
    # the summary can go into a copy's card, which stays loadable
    copy = tmp_path / "copy.pt"
    copy.write_bytes(full_run.weights_path.read_bytes())
    card_path_for(copy).write_bytes(card_path_for(full_run.weights_path).read_bytes())
    card = record_metrics_in_card(copy, report, prefix="synthetic_")
    assert card.metrics["synthetic_dice_n"] == 2.0
    assert load_model(copy, "flair", ["flair"])[1].metrics == card.metrics


def test_loocv_scores_every_held_out_case_in_three_arms(full_run, cases: CaseSet, tmp_path: Path):
    tiny = FinetuneSettings(
        **SETTINGS.model_dump(exclude={"task", "channels", "depth", "base_width", "dilation"})
    )
    settings = LoocvSettings(
        finetune=tiny.model_copy(update={"steps": 2}),
        scratch=SETTINGS.model_copy(update={"steps": 2}),
        evaluate=EvaluateSettings(device="cpu", cpu_threads=1, step_mm=32, progress=False),
        fold_by="case",  # the synthetic cases share one brain, so one subject
    )
    report = loocv(full_run.weights_path, cases, tmp_path / "loocv", settings, task="flair")
    assert report.folds == [[case_id] for case_id in cases.case_ids]
    assert set(report.arms) == {"default", "fine-tuned", "from scratch"}
    for scores in report.arms.values():
        assert [c.case_id for c in scores] == list(cases.case_ids)
    # a fold's models never saw its held-out case
    card = load_model(
        tmp_path / "loocv" / "fold_00" / "finetuned" / "flair.pt", "flair", ["flair"]
    )[1]
    assert cases.case_ids[0] not in card.training_data.split("fine-tuning:")[1]
    assert cases.case_ids[1] in card.training_data.split("fine-tuning:")[1]
    markdown = (tmp_path / "loocv" / "loocv.md").read_text()
    assert "fine-tuned" in markdown and cases.case_ids[2] in markdown
    saved = json.loads((tmp_path / "loocv" / "loocv.json").read_text())
    assert set(saved["summary"]) == set(report.arms)
    reread = LoocvReport.read(tmp_path / "loocv")  # a finished run can be re-summarised
    assert json.dumps(reread.as_dict()) == json.dumps(report.as_dict())
    # the fine-tuned arm's held-out means and the tables go into a card
    copy = tmp_path / "copy.pt"
    copy.write_bytes(full_run.weights_path.read_bytes())
    card_path_for(copy).write_bytes(card_path_for(full_run.weights_path).read_bytes())
    updated = record_metrics_in_card(
        copy, report, prefix="loocv_", arm="fine-tuned", evaluation=report.comparison_table()
    )
    assert updated.metrics["loocv_dice_n"] == 3.0
    assert "from scratch" in updated.evaluation
    with pytest.raises(ValueError, match="arms"):
        record_metrics_in_card(copy, report)


def test_seed_spread_trains_each_extra_seed_once(
    full_run, cases: CaseSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from lesionwatch.models import reproduce

    finetune_settings = FinetuneSettings(
        **SETTINGS.model_dump(exclude={"task", "channels", "depth", "base_width", "dilation"})
    )
    plan = reproduce.ReproducePlan(
        task="flair",
        synthetic_cases=3,
        pretrain=SETTINGS,
        finetune=finetune_settings,
        evaluate=EvaluateSettings(device="cpu", cpu_threads=1, step_mm=32, progress=False),
        spread_seeds=(1,),
    )
    held_out = cases.subset([0, 1])
    default = list(evaluate(full_run.weights_path, held_out, plan.evaluate).cases)
    spread = reproduce.seed_spread(plan, cases, held_out, tmp_path, default)
    assert spread is not None and sorted(spread.runs) == [0, 1]
    assert spread.runs[0] == default
    other = tmp_path / "pretrain_seed1" / "flair_seed1.pt"
    assert not torch.equal(
        next(iter(load_model(other, "flair", ["flair"])[0].state_dict().values())),
        next(iter(load_model(full_run.weights_path, "flair", ["flair"])[0].state_dict().values())),
    )
    assert "mean ± SD over 2 seeds" in spread.table(reference_seed=0)

    # a rerun reuses the saved scores instead of training again
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(reproduce, "train", no_training)
    again = reproduce.seed_spread(plan, cases, held_out, tmp_path, default)
    assert again is not None
    assert [c.as_dict() for c in again.runs[1]] == [c.as_dict() for c in spread.runs[1]]
    assert (
        reproduce.seed_spread(
            plan.model_copy(update={"spread_seeds": ()}), cases, held_out, tmp_path, default
        )
        is None
    )
