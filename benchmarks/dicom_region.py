"""Reading the box a lesion patch needs from a DICOM series: the slices it spans (an evenly spaced stack, described
from its headers) against decoding the whole series, as ``medfm crop|extract`` did before.

Writes a synthetic CT series (``--size`` x y, ``--slices``, 0.7 × 0.7 mm, ``--gap`` mm) with pydicom, then times, in
this process, (a) the whole series read + crop and (b) header scan + the box's slices, for the box of a 50³ fmcib
patch at a few seeds; medians of ``--repeats``. The arrays are checked equal.

    .venv/bin/python benchmarks/dicom_region.py [--size 512 512 --slices 160 --gap 2.5 --repeats 3 --rle]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from medfm.data.io import dicom_stack, read_stack_region, read_volume
from medfm.data.patches import plan_patch, source_region
from medfm.data.profiles import FMCIB


def write_series(folder: Path, size: tuple[int, int], slices: int, gap: float, rle: bool = False) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[: size[1], : size[0]]
    body = ((xx - size[0] / 2) / (0.45 * size[0])) ** 2 + ((yy - size[1] / 2) / (0.38 * size[1])) ** 2 <= 1
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "BENCH", k + 1
        ds.ImagePositionPatient = [-179.2, -179.2, -200.0 + k * gap]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], gap
        ds.Rows, ds.Columns = size[1], size[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = np.where(body, 1064, 24) + rng.normal(0, 15, body.shape)
        ds.PixelData = pixels.astype(np.int16).tobytes()
        if rle:  # RLE Lossless: a compressed transfer syntax pydicom writes and GDCM decodes
            ds.compress(RLELossless)
        ds.save_as(folder / f"slice_{k:04d}.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--gap", type=float, default=2.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rle", action="store_true", help="RLE-compressed slices (decoding then dominates)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="medfm_dicom_region_")) / "series"
    try:
        write_series(folder, tuple(args.size), args.slices, args.gap, args.rle)
        geometry = dicom_stack(folder).geometry
        seeds = [geometry.index_to_world(np.array([x, y, z], float)) for x, y, z in
                 ((256, 256, args.slices / 2), (180, 300, args.slices / 4), (330, 200, 3 * args.slices / 4))]  # fmt: skip
        print(
            f"DICOM series {args.size[0]}×{args.size[1]}×{args.slices} at 0.7×0.7×{args.gap} mm"
            f"{', RLE-compressed' if args.rle else ''}; the box of one "
            f"50³ fmcib patch per seed; median of {args.repeats}"
        )
        whole_times, box_times, slices_read = [], [], []
        for seed in seeds:
            for _ in range(args.repeats):
                start = time.perf_counter()
                volume = read_volume(folder)
                box = source_region(volume.geometry, [plan_patch(volume.geometry, seed, FMCIB)])
                (x0, y0, z0), (sx, sy, sz) = box
                reference = volume.array[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx]
                whole_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                stack = dicom_stack(folder)
                box = source_region(stack.geometry, [plan_patch(stack.geometry, seed, FMCIB)])
                region = read_stack_region(stack, *box)
                box_times.append(time.perf_counter() - start)
                slices_read.append(box[1][2])
                assert np.array_equal(region.array, reference)
        whole, part = statistics.median(whole_times), statistics.median(box_times)
        print(f"whole series + crop      {whole:7.3f} s  ({args.slices} slices decoded)")
        print(f"headers + the box only   {part:7.3f} s  ({int(statistics.median(slices_read))} slices decoded)")
        print(f"ratio                    {whole / part:7.1f}× faster (arrays equal)")
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
