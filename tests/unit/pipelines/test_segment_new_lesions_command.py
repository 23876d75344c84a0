"""`lesionwatch segment new-lesions` and `segment enhancing` end to end on real image pairs
saved as NIfTI, with U-Nets of known output saved as weight files with their cards."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from known_unet import difference_threshold_unet, intensity_threshold_unet
from moved_pairs import SPACING_MM, MovedPair, moved_pair

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.models.weights import save_model
from lesionwatch.service.cli import main

CONFIG = (
    "inference: {device: cpu, patch_size_mm: 64, step_mm: 64}\n"
    "pipelines:\n"
    "  new_lesions: {min_lesion_volume_mm3: 20.0, registration: rigid}\n"
    "  enhancing: {min_lesion_volume_mm3: 20.0}\n"
)


def _weights(tmp_path: Path, task: str, channels: tuple[str, ...], threshold_z: float) -> Path:
    path = tmp_path / "weights" / f"{task}.pt"
    save_model(
        difference_threshold_unet(threshold_z, 8.0), path, task=task,  # type: ignore[arg-type]
        channels=channels, version="test", spacing_mm=(SPACING_MM,) * 3, patch_size_mm=64,
        training_data="none: weights set by hand for a plumbing test",
    )  # fmt: skip
    return path


def _save_pair(tmp_path: Path, pair: MovedPair) -> tuple[Path, Path]:
    earlier, later = tmp_path / "earlier.nii.gz", tmp_path / "later.nii.gz"
    pair.earlier.save(earlier)
    pair.later.save(later)
    return earlier, later


def test_segment_new_lesions_writes_the_new_lesion_on_the_current_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = moved_pair("FLAIR.nii.gz", "FLAIR.nii.gz")
    prior, current = _save_pair(tmp_path, pair)
    channels = ("prior_flair_registered", "current_flair", "difference")
    weights = _weights(tmp_path, "new_lesions", channels, 3.0)
    flair_weights = tmp_path / "weights" / "flair.pt"  # tracking runs it at both time points
    save_model(
        intensity_threshold_unet(3.0, 8.0), flair_weights, task="flair", channels=("flair",),
        version="test", spacing_mm=(SPACING_MM,) * 3, patch_size_mm=64,
        training_data="none: weights set by hand for a plumbing test",
    )  # fmt: skip
    config = tmp_path / "lw.yaml"
    config.write_text(
        CONFIG + f"  flair: {{weights: {flair_weights}, min_lesion_volume_mm3: 20.0}}\n"
    )
    out = tmp_path / "out"
    status = main(
        [
            "segment", "new-lesions", "--prior", str(prior), "--current", str(current),
            "--out", str(out / "mask.nii.gz"), "--table", str(out / "lesions.csv"),
            "--weights", str(weights), "--config", str(config),
        ]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1 lesions" in printed and "time per step" in printed
    assert "registration.rigid" in printed  # the config's kind reached the pipeline
    assert "Change since prior: 1 new" in printed
    assert "Radiological activity: yes" in printed

    mask = ImageVolume.load(out / "mask.nii.gz")
    assert mask.same_grid(ImageVolume.load(current))
    assert (mask.array > 0)[pair.sphere].all()
    with (out / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert float(rows[0]["volume_ml"]) == pytest.approx(pair.sphere_ml, rel=0.1)


def test_segment_enhancing_writes_the_mask_on_the_post_contrast_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pair = moved_pair("T1.nii.gz", "T1POST.nii.gz")
    t1, t1_post = _save_pair(tmp_path, pair)
    weights = _weights(tmp_path, "enhancing", ("t1_pre", "t1_post", "difference"), 5.0)
    config = tmp_path / "lw.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out" / "mask.nii.gz"
    status = main(
        [
            "segment", "enhancing", "--t1", str(t1), "--t1-post", str(t1_post), "--out", str(out),
            "--weights", str(weights), "--config", str(config),
        ]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    assert "registration.rigid" in capsys.readouterr().out
    mask = ImageVolume.load(out)
    assert mask.same_grid(ImageVolume.load(t1_post))
    assert (mask.array > 0)[pair.sphere].all()


def test_missing_weights_and_unfitting_weights_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(Path(__file__).resolve().parents[2] / "data/open_ms_data/cross_sectional"
                / "patient07/FLAIR.nii.gz")  # fmt: skip
    out = str(tmp_path / "m.nii.gz")
    none = str(tmp_path / "none.pt")
    assert main(["segment", "new-lesions", "--prior", image, "--current", image, "--out", out,
                 "--weights", none]) == 2  # fmt: skip
    assert "no weights for the new_lesions pipeline" in capsys.readouterr().err
    assert main(["segment", "enhancing", "--t1", image, "--t1-post", image, "--out", out,
                 "--weights", none]) == 2  # fmt: skip
    assert "no weights for the enhancing pipeline" in capsys.readouterr().err
    # weights made for the other two-image task
    enhancing = _weights(tmp_path, "enhancing", ("t1_pre", "t1_post", "difference"), 5.0)
    assert main(["segment", "new-lesions", "--prior", image, "--current", image, "--out", out,
                 "--weights", str(enhancing)]) == 2  # fmt: skip
    assert "task is 'enhancing', the pipeline runs 'new_lesions'" in capsys.readouterr().err
    assert main(["segment", "new-lesions", "--prior", str(tmp_path / "missing.nii.gz"),
                 "--current", image, "--out", out, "--weights", str(enhancing)]) == 2  # fmt: skip
    assert "neither an image file nor a folder" in capsys.readouterr().err
