"""Brain-mask Dice of pipelines.steps.brain_mask against the open_ms_data reference masks.

For each longitudinal study the raw FLAIR is N4-corrected and brain-extracted on its own grid;
the reference `brainmask_common_space.nii.gz` is brought onto that grid with the inverse of
`studyY_FLAIR_to_common_space.txt` (an ITK transform maps fixed = common-space points to
moving = raw-FLAIR points, so the common -> raw direction is its inverse; the forward one was
checked to overlap the head worse on every study). The cross-sectional (already
skull-stripped) FLAIRs are checked against their nonzero region.

    .venv/bin/python tests/benchmarks/eval_brain_mask.py [--data DIR]

DIR defaults to ../shared/data/open_ms_data next to the repository.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.pipelines.preprocess import preprocess
from lesionwatch.pipelines.steps import correct_bias_field, extract_brain_mask

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "open_ms_data"


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def reference_on_flair(patient_dir: Path, study: str, flair_path: Path) -> npt.NDArray[np.bool_]:
    reference = sitk.ReadImage(str(patient_dir / "brainmask_common_space.nii.gz"))
    transform = sitk.ReadTransform(str(patient_dir / f"{study}_FLAIR_to_common_space.txt"))
    flair = sitk.ReadImage(str(flair_path))
    on_flair = sitk.Resample(reference, flair, transform.GetInverse(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(on_flair) > 0


def evaluate_longitudinal(root: Path) -> list[float]:
    """Dice on the raw FLAIR grid of (a) the mask computed there and (b) the mask preprocess()
    computes on its 1 mm grid, mapped back with `mask_to_source_grid`."""
    scores = []
    print(
        f"{'study':<18}{'dice':>7}{'dice_1mm':>9}{'ours_ml':>8}{'ref_ml':>7}"
        f"{'n4_s':>6}{'mask_s':>7}{'prep_s':>7}{'t1reg_s':>8}"
    )
    for patient_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for flair_path in sorted(patient_dir.glob("study*_FLAIR.nii.gz")):
            study = flair_path.name.split("_")[0]
            flair = ImageVolume.load(flair_path)
            start = time.perf_counter()
            corrected = correct_bias_field(flair)
            n4_s = time.perf_counter() - start
            start = time.perf_counter()
            ours = extract_brain_mask(corrected).array > 0
            mask_s = time.perf_counter() - start
            t1_path = patient_dir / f"{study}_T1W.nii.gz"
            t1 = ImageVolume.load(t1_path) if t1_path.is_file() else None
            start = time.perf_counter()
            prepared = preprocess(flair, t1=t1)
            prep_s = time.perf_counter() - start
            t1reg = [s.seconds for s in prepared.steps if s.name.startswith("t1_rigid")]
            mask_1mm = prepared.brain_mask.with_array(prepared.brain_mask.array.astype(np.float32))
            via_1mm = prepared.mask_to_source_grid(mask_1mm).array > 0
            reference = reference_on_flair(patient_dir, study, flair_path)
            score = dice(ours, reference)
            scores.append(score)
            voxel_ml = flair.voxel_volume_mm3 / 1000.0
            print(
                f"{patient_dir.name + '/' + study:<18}{score:7.4f}{dice(via_1mm, reference):9.4f}"
                f"{ours.sum() * voxel_ml:8.0f}{reference.sum() * voxel_ml:7.0f}{n4_s:6.1f}"
                f"{mask_s:7.1f}{prep_s:7.1f}{(f'{t1reg[0]:.1f}' if t1reg else '-'):>8}",
                flush=True,
            )
    print(f"{'mean':<18}{np.mean(scores):7.4f}   (n={len(scores)})")
    return scores


def evaluate_skull_stripped(root: Path) -> None:
    for flair_path in sorted(root.glob("*/FLAIR.nii.gz")):
        flair = ImageVolume.load(flair_path)
        start = time.perf_counter()
        ours = extract_brain_mask(flair).array > 0
        mask_s = time.perf_counter() - start
        nonzero = ndimage.binary_fill_holes(np.abs(flair.array) > 1e-6)
        name = f"{flair_path.parent.name} (stripped)"
        print(f"{name:<18}{dice(ours, nonzero):7.4f}  vs its nonzero region, {mask_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="open_ms_data folder")
    args = parser.parse_args()
    longitudinal = args.data / "longitudinal"
    if not longitudinal.is_dir():
        raise SystemExit(f"no longitudinal data at {longitudinal}: pass --data")
    evaluate_longitudinal(longitudinal)
    if (args.data / "cross_sectional").is_dir():
        evaluate_skull_stripped(args.data / "cross_sectional")


if __name__ == "__main__":
    main()
