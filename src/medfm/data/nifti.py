"""What a NIfTI header says that ITK does not pass on: the voxel bytes it promises, NaN/Inf voxels, qform and sform.

ITK's NIfTI reader fills a cut file with zeros, reads NaN and ±Inf voxels as 0 and picks one of two disagreeing
orientations without a word; these checks read the header (and, for float data, the voxels) themselves.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from medfm.errors import VolumeError

_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64 voxels
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a single-file NIfTI-1/2 header that medfm checks."""

    endian: str
    dims: tuple[int, ...]  # dim[1..dim[0]]
    datatype: int
    bitpix: int
    offset: int
    pixdim: tuple[float, ...]  # pixdim[0..7]; pixdim[0] is qfac
    qform_code: int
    sform_code: int
    quatern: tuple[float, float, float]
    qoffset: tuple[float, float, float]
    srows: tuple[tuple[float, ...], ...]  # srow_x, srow_y, srow_z

    @property
    def expected_bytes(self) -> int:
        """Bytes the file must hold: header, extensions and every voxel."""
        return self.offset + int(np.prod([max(d, 1) for d in self.dims])) * self.bitpix // 8

    def qform(self) -> np.ndarray:
        """The qform as a 4×4 index → RAS millimetre affine (NIfTI-1 standard, method 2)."""
        b, c, d = self.quatern
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array([
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ])  # fmt: skip
        qfac = -1.0 if self.pixdim[0] < 0 else 1.0
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([self.pixdim[1], self.pixdim[2], qfac * self.pixdim[3]])
        affine[:3, 3] = self.qoffset
        return affine

    def sform(self) -> np.ndarray:
        """The sform as a 4×4 index → RAS millimetre affine."""
        return np.vstack([np.asarray(self.srows, dtype=float), [0.0, 0.0, 0.0, 1.0]])


def is_gzip(path: str) -> bool:
    """Whether a file is gzip-compressed, by its content."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open(path: str):  # noqa: ANN202 - a binary file object, plain or gzip
    return (gzip.open if is_gzip(path) else open)(path, "rb")


def read_header(path: str) -> NiftiHeader | None:
    """The header of a single-file NIfTI-1/2 file; None when the file is not one (or its header is cut)."""
    with _open(path) as f:
        hdr = f.read(540)
    for e in "<>":
        if len(hdr) >= 348 and struct.unpack(e + "i", hdr[:4])[0] == 348 and hdr[344:347] == b"n+1":
            ndim = struct.unpack(e + "8h", hdr[40:56])
            datatype, bitpix = struct.unpack(e + "2h", hdr[70:74])
            pixdim = struct.unpack(e + "8f", hdr[76:108])
            offset = int(struct.unpack(e + "f", hdr[108:112])[0])
            qcode, scode = struct.unpack(e + "2h", hdr[252:256])
            q = struct.unpack(e + "6f", hdr[256:280])
            srows = struct.unpack(e + "12f", hdr[280:328])
        elif len(hdr) >= 540 and struct.unpack(e + "i", hdr[:4])[0] == 540 and hdr[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(e + "2h", hdr[12:16])
            ndim = struct.unpack(e + "8q", hdr[16:80])
            pixdim = struct.unpack(e + "8d", hdr[104:168])
            offset = struct.unpack(e + "q", hdr[168:176])[0]
            qcode, scode = struct.unpack(e + "2i", hdr[344:352])
            q = struct.unpack(e + "6d", hdr[352:400])
            srows = struct.unpack(e + "12d", hdr[400:496])
        else:
            continue
        if not 1 <= ndim[0] <= 7 or bitpix <= 0:
            return None
        return NiftiHeader(
            endian=e,
            dims=tuple(int(d) for d in ndim[1 : ndim[0] + 1]),
            datatype=int(datatype),
            bitpix=int(bitpix),
            offset=int(offset),
            pixdim=tuple(float(v) for v in pixdim),
            qform_code=int(qcode),
            sform_code=int(scode),
            quatern=tuple(float(v) for v in q[:3]),
            qoffset=tuple(float(v) for v in q[3:]),
            srows=(tuple(srows[0:4]), tuple(srows[4:8]), tuple(srows[8:12])),
        )
    return None


def check_complete(path: str) -> None:
    """Raise when a NIfTI file holds fewer voxel bytes than its header says (ITK fills the rest with 0)."""
    try:
        header = read_header(path)
        if header is None:
            return
        expected = header.expected_bytes
        if not is_gzip(path):  # by content: ITK reads a plain NIfTI named .nii.gz too
            have = os.path.getsize(path)
        else:
            with open(path, "rb") as f:  # fast path: the gzip trailer holds the size mod 2**32
                f.seek(-4, os.SEEK_END)
                if struct.unpack("<I", f.read(4))[0] == expected % 2**32:
                    return
            have = 0
            with gzip.open(path, "rb") as f:
                while have < expected and (chunk := f.read(1 << 22)):
                    have += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise VolumeError(path, "file is truncated or corrupt (the compressed data ends early)") from None
    if have < expected:
        raise VolumeError(path, f"file is truncated: {have} of {expected} bytes of header and voxel data")


def nonfinite_voxels(path: str) -> np.ndarray | None:
    """(x, y, z) indices of the NaN/±Inf voxels of a float NIfTI file (ITK reads them as 0); None for other files.

    The voxels are streamed from the file (decompressed once) and only the non-finite ones are kept.
    """
    if not path.lower().endswith((".nii", ".nii.gz")):
        return None
    header = read_header(path)
    if header is None or header.datatype not in _FLOAT_TYPES:
        return None
    dtype = np.dtype(header.endian + _FLOAT_TYPES[header.datatype])
    nx, ny, nz = (list(header.dims[:3]) + [1, 1])[:3]
    total = nx * ny * nz  # the first volume of a 4D file: what medfm reads
    found: list[np.ndarray] = []
    chunk = (1 << 22) // dtype.itemsize
    with _open(path) as f:
        f.read(header.offset)
        start = 0
        while start < total:
            data = np.frombuffer(f.read(min(chunk, total - start) * dtype.itemsize), dtype=dtype)
            if not len(data):
                break
            bad = np.flatnonzero(~np.isfinite(data))
            if len(bad):
                found.append(bad + start)
            start += len(data)
    flat = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return np.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], axis=1)


def form_disagreement(path: str, matrix_lps: np.ndarray, tolerance_mm: float = 0.1) -> str | None:
    """A warning when a NIfTI file's qform and sform place the volume differently: both, how far, and which one
    ``matrix_lps`` (what SimpleITK read: index → LPS) follows; None when they agree or only one is set."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        return None
    header = read_header(path)
    if header is None or header.qform_code <= 0 or header.sform_code <= 0:
        return None
    size = [max(d, 1) for d in (list(header.dims[:3]) + [1, 1])[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    qform, sform = _LPS_RAS @ header.qform(), _LPS_RAS @ header.sform()
    apart = float(np.linalg.norm((corners @ qform.T - corners @ sform.T)[:, :3], axis=1).max())
    if apart <= tolerance_mm:
        return None
    used = corners @ np.asarray(matrix_lps).T
    by_q = np.abs(used - corners @ qform.T).max()
    by_s = np.abs(used - corners @ sform.T).max()
    chosen = "qform" if by_q <= by_s else "sform"
    q0, s0 = (tuple(round(float(v), 1) + 0.0 for v in m[:3, 3]) for m in (qform, sform))
    return (
        f"{path}: the NIfTI qform (code {header.qform_code}) and sform (code {header.sform_code}) disagree by up to "
        f"{apart:.1f} mm (voxel (0, 0, 0) at LPS {q0} by the qform, {s0} by the sform); medfm reads with SimpleITK, "
        f"which uses the {chosen} here (nibabel and nilearn use the sform); check which one is right"
    )
