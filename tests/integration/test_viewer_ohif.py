"""What a radiologist sees: LesionWatch's SEG and SR of a real FLAIR in OHIF, the web viewer.

The whole open_ms_data patient07 FLAIR (182 axial slices of 218 x 182, 1 mm) is written as a
DICOM study; LesionWatch builds its SEG (with the site default encoding) and SR from the real
consensus lesion mask. Orthanc (Debian 'orthanc' + 'orthanc-dicomweb') holds the study in a
network namespace of its own (Orthanc 1.10 listens on every interface); OHIF (`@ohif/app`,
prebuilt, pinned) is served there beside a same-origin proxy to Orthanc's DICOMweb and opened
in headless Chromium (Debian, SwiftShader WebGL) directly on a lesion slice (probe.cjs).
Checks:
- the segmentation OHIF decoded equals the mask on every one of the 182 slices;
- on the rendered lesion slice, pixels inside lesions are coloured, pixels just outside not;
- OHIF parses every lesion of the SR, places it on its FLAIR image, restores them as
  measurements (each lesion's TID 1410 "Image Region" POINT becomes a Probe, inside the
  lesion) and lists them in its Measurements panel.
Screenshots stay in build/viewer-test/ (printed): 1-flair.png, 2-seg-overlay.png,
3-sr-measurements.png (viewer with the Measurements panel) and 3-sr-panel.png (the panel).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REPO_ROOT, TEST_DATA, require_executable, require_service
from orthanc_server import dicomweb_plugin
from PIL import Image
from scipy import ndimage

from lesionwatch.config.schema import ResultsConfig, SeriesClass
from lesionwatch.dicom_io.codes import FINDING_CONCEPTS, FindingType
from lesionwatch.dicom_io.image_volume import ImageVolume
from lesionwatch.dicom_io.results import (
    AlgorithmIdentity,
    FindingInput,
    JobIdentity,
    build_result_objects,
)
from lesionwatch.dicom_io.series_identity import StudyIdentity
from lesionwatch.dicom_io.series_reader import read_series
from lesionwatch.dicom_io.series_writer import write_series
from lesionwatch.pipelines.postprocess import lesion_table

pytestmark = pytest.mark.integration

OHIF_VERSION = "3.13.2"  # @ohif/app, prebuilt dist
PLAYWRIGHT_CORE_VERSION = "1.65.1"  # drives the Debian chromium; no browser download
PATIENT07 = TEST_DATA / "open_ms_data" / "cross_sectional" / "patient07"
CACHE = REPO_ROOT / "build" / "viewer-cache"
SCREENSHOTS = REPO_ROOT / "build" / "viewer-test"
HERE = Path(__file__).resolve().parent / "ohif"
COLOURED = 40  # max - min of R, G, B: the lesion colour over grey; grey pixels are ~0


@dataclass(frozen=True)
class ViewerStudy:
    files: list[Path]
    mask: ImageVolume  # on the FLAIR grid
    slice_uids: list[str]  # k -> SOP Instance UID of the FLAIR slice
    job: dict[str, object]
    lesion_k: int
    lesion_count: int


def _npm_install() -> tuple[Path, Path]:
    """OHIF's prebuilt dist and playwright-core, fetched once into build/viewer-cache."""
    npm = require_executable("npm")
    dist = CACHE / f"ohif-app-{OHIF_VERSION}" / "dist"
    node_modules = CACHE / f"node-{PLAYWRIGHT_CORE_VERSION}"
    playwright = node_modules / "node_modules" / "playwright-core"
    try:
        if not (dist / "index.html").is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(CACHE)],
                check=True,
                capture_output=True,
                timeout=300,
            )
            archive = CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
            unpacked = CACHE / "unpacking"
            shutil.rmtree(unpacked, ignore_errors=True)
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
            shutil.rmtree(dist.parent, ignore_errors=True)
            (unpacked / "package").rename(dist.parent)
            archive.unlink()
        if not (playwright / "package.json").is_file():
            subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(node_modules)]
                + [f"playwright-core@{PLAYWRIGHT_CORE_VERSION}"],
                check=True,
                capture_output=True,
                timeout=300,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        require_service(False, f"npm could not fetch OHIF/playwright-core: {detail[-500:]!r}")
    return dist, playwright


def _identity() -> StudyIdentity:
    return StudyIdentity.from_seed(
        "viewer-patient07",
        patient_id="LW-VIEWER-07",
        patient_name="Viewer^Patient07",
        birth_date=dt.date(1980, 5, 17),
        sex="F",
        study_date=dt.date(2024, 3, 1),
        study_description="MR brain MS (viewer test)",
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ViewerStudy:
    root = tmp_path_factory.mktemp("viewer")
    flair_paths = write_series(
        ImageVolume.load(PATIENT07 / "FLAIR.nii.gz"),
        root / "flair",
        contrast=SeriesClass.FLAIR,
        identity=_identity(),
        series_number=3,
    )
    flair = [pydicom.dcmread(p) for p in flair_paths]
    grid = read_series(flair)
    lesions = ImageVolume.load(PATIENT07 / "lesion_mask.nii.gz").array > 0
    mask = grid.with_array(lesions.astype(np.uint8))
    table = lesion_table(mask)
    model = AlgorithmIdentity("LesionWatch FLAIR lesion U-Net", "1.0.0", "a1" * 32)
    results = build_result_objects(
        [FindingInput(FindingType.MS_LESION, flair, mask, table, model)],
        job=JobIdentity("viewer-test/patient07"),
        config=ResultsConfig(secondary_capture=False, json_export=False),
    )
    (seg,) = results.segmentations
    sr = results.report
    assert sr is not None
    files = list(flair_paths)
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        ds.save_as(root / name, enforce_file_format=True)
        files.append(root / name)
    uid_of_k = {int(ds.InstanceNumber) - 1: str(ds.SOPInstanceUID) for ds in flair}
    slice_uids = [uid_of_k[k] for k in range(len(flair))]
    area = mask.array.reshape(mask.array.shape[0], -1).sum(axis=1)
    lesion_k = int(np.argmax(area))
    dist, playwright = _npm_install()
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    job: dict[str, object] = {
        "files": [str(p) for p in files],
        "out_dir": str(SCREENSHOTS),
        "result_path": str(SCREENSHOTS / "result.json"),
        "node": require_executable("node"),
        "chromium": require_executable("chromium"),
        "playwright_core": str(playwright),
        "ohif_dist": str(dist),
        "study_uid": str(flair[0].StudyInstanceUID),
        "flair_series_uid": str(flair[0].SeriesInstanceUID),
        "lesion_sop_uid": slice_uids[lesion_k],
        "seg_series_uid": str(seg.SeriesInstanceUID),
        "sr_series_uid": str(sr.SeriesInstanceUID),
        "sr_series_description": str(sr.SeriesDescription),
        "frame_of_reference_uid": str(flair[0].FrameOfReferenceUID),
        "sample_points_lps": [],
    }
    return ViewerStudy(files, mask, slice_uids, job, lesion_k, len(table))


def _samples(study: ViewerStudy) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) pixels of the lesion slice: inside lesions (not on their edge), and a ring two
    to three pixels outside them."""
    on = study.mask.array[study.lesion_k] > 0
    inside = ndimage.binary_erosion(on)
    near = ndimage.binary_dilation(on, iterations=3) & ~ndimage.binary_dilation(on, iterations=1)
    return np.argwhere(inside)[:, ::-1], np.argwhere(near)[:, ::-1]


def _run_viewer(study: ViewerStudy) -> dict[str, object]:
    unshare = require_executable("unshare")
    require_executable("ip")
    require_executable("Orthanc")
    require_service(dicomweb_plugin() is not None, "Debian package orthanc-dicomweb is missing")
    inside, outside = _samples(study)
    k = study.lesion_k
    points = [(float(i), float(j), float(k)) for i, j in [*inside, *outside]]
    job = dict(study.job)
    job["sample_points_lps"] = study.mask.index_to_lps(points).tolist()
    job_path = SCREENSHOTS / "job.json"
    job_path.write_text(json.dumps(job))
    # A network namespace of its own: only loopback exists, so nothing outside can reach
    # Orthanc (1.10 binds every interface). Not root: a user namespace maps us to root.
    namespace = [unshare, "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    command = [
        *namespace,
        "sh",
        "-c",
        'ip link set lo up && exec "$0" "$@"',
        sys.executable,
        str(HERE / "session.py"),
        str(job_path),
    ]
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=400)
    print(f"viewer session: {time.monotonic() - started:.0f} s; screenshots in {SCREENSHOTS}")
    result_path = SCREENSHOTS / "result.json"
    assert result_path.is_file(), f"the viewer session wrote no result:\n{run.stderr[-3000:]}"
    result: dict[str, object] = json.loads(result_path.read_text())
    result["inside_count"] = len(inside)
    return result


@pytest.fixture(scope="module")
def viewer(study: ViewerStudy) -> dict[str, object]:
    return _run_viewer(study)


def test_ohif_shows_the_seg_and_decodes_it_as_the_mask_slice_by_slice(
    study: ViewerStudy, viewer: dict[str, object]
) -> None:
    steps = "\n".join(map(str, viewer.get("steps", [])))
    assert viewer.get("ok"), f"{viewer.get('error')}\nsteps:\n{steps}\n{viewer.get('http_errors')}"
    decoded: dict[str, list[int]] = viewer["segmentation"]["slices"]  # type: ignore[index]
    assert set(decoded) == set(study.slice_uids), "OHIF decoded other slices than the FLAIR's"
    wrong = []
    for k, uid in enumerate(study.slice_uids):
        expected = np.flatnonzero(study.mask.array[k].ravel())
        if not np.array_equal(np.asarray(decoded[uid], dtype=np.int64), expected):
            wrong.append(k)
    lesion_slices = int((study.mask.array.reshape(len(study.slice_uids), -1).sum(1) > 0).sum())
    assert wrong == [], f"{len(wrong)} of {lesion_slices} lesion slices differ: k = {wrong[:20]}"


def test_rendered_lesion_pixels_are_coloured_and_their_surroundings_not(
    viewer: dict[str, object],
) -> None:
    assert viewer.get("ok"), viewer.get("error")
    screenshot = np.asarray(Image.open(SCREENSHOTS / "2-seg-overlay.png").convert("RGB"))
    samples = viewer["samples"]
    points = np.rint(np.asarray(samples["points"])).astype(int)  # type: ignore[index]
    n_inside = int(viewer["inside_count"])  # type: ignore[arg-type]
    rgb = screenshot[points[:, 1], points[:, 0]].astype(int)
    chroma = rgb.max(axis=1) - rgb.min(axis=1)
    inside, outside = chroma[:n_inside], chroma[n_inside:]
    assert n_inside > 20 and len(outside) > 20
    assert (inside >= COLOURED).all(), f"{(inside < COLOURED).sum()} of {n_inside} not coloured"
    assert (outside < COLOURED).all(), f"{(outside >= COLOURED).sum()} coloured outside lesions"
    expected = np.asarray(FINDING_CONCEPTS[FindingType.MS_LESION].display_rgb)
    mean = rgb[:n_inside].mean(axis=0)
    assert np.argmax(mean) == np.argmax(expected) and np.argmin(mean) == np.argmin(expected)


def test_ohif_lists_every_lesion_of_the_sr_in_its_measurements_panel(
    study: ViewerStudy, viewer: dict[str, object]
) -> None:
    assert viewer.get("ok"), viewer.get("error")
    sr = viewer["sr"]
    label = FINDING_CONCEPTS[FindingType.MS_LESION].label
    names = [f"{label} {n}" for n in range(1, study.lesion_count + 1)]
    assert set(names) <= set(sr["tracking_identifiers"])  # type: ignore[index]
    # lesions and the summary (located at its largest lesion), each placed on a FLAIR image
    groups = study.lesion_count + 1
    assert sr["count"] == sr["with_coordinates"] == sr["loaded"] == groups  # type: ignore[index]
    annotations: list[dict[str, object]] = viewer["sr_annotations"]  # type: ignore[assignment]
    assert len(annotations) == groups
    frames = {a["frame_of_reference_uid"] for a in annotations}
    assert frames == {study.job["frame_of_reference_uid"]}
    # restored as measurements (Probe tool), each on a FLAIR slice and inside a lesion
    measurements: list[dict[str, object]] = viewer["sr_measurements"]  # type: ignore[assignment]
    assert len(measurements) == groups
    assert {m["tool"] for m in measurements} == {"Probe"}
    assert {m["sop_instance_uid"] for m in measurements} <= set(study.slice_uids)
    points = np.asarray([m["points"][0] for m in measurements], dtype=float)  # type: ignore[index]
    inverse = np.linalg.inv(study.mask.affine_lps)
    ijk = np.rint((np.c_[points, np.ones(len(points))] @ inverse.T)[:, :3]).astype(int)
    assert (study.mask.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]] > 0).all()
    for m, (_, _, k) in zip(measurements, ijk, strict=True):
        assert m["sop_instance_uid"] == study.slice_uids[k]
    # ... and listed where the radiologist looks: one row each in the Measurements panel
    rows: list[str] = viewer["panel_rows"]  # type: ignore[assignment]
    assert len(rows) == groups
    assert all("Lesion" in row for row in rows)
    for name in ("3-sr-measurements.png", "3-sr-panel.png"):
        assert (SCREENSHOTS / name).is_file(), name
