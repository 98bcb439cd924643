"""Detection data: a box manifest read and checked once, images resized once into memory, seeded box-aware views.

Every image is read with :func:`medfm.data.images2d.read_image2d` ([0, 1]), turned to the profile's channels and
resized to ``image_size`` with the profile's policy (``resize`` stretches, ``letterbox`` keeps the aspect and pads;
``shorter-crop`` would cut boxes off and is refused) — the same code as every other 2D input of medfm, without the
mean/std step, which the detector does itself with the profile's values. Boxes go through the same mapping
(:class:`Frame`), and predictions come back through its inverse. Training views are torchvision ``transforms.v2``
on ``tv_tensors`` (horizontal flip, a small affine, brightness/contrast), each drawn from (seed, epoch, image),
so a run is the same whatever the number of workers or ranks; boxes pushed off the image are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medfm.data.images2d import preprocess2d, read_image2d
from medfm.data.outputs import write_errors
from medfm.data.profiles import Profile2D, get_profile
from medfm.data.splits import assign_splits, split_names, subsample
from medfm.detect.boxes import BoxTable, ImageBoxes, read_boxes
from medfm.errors import ConfigError, MedfmError, ProfileError, RowError
from medfm.progress import progress_bar
from medfm.seeding import seeded
from medfm.train.sampler import EpochSampler, world

_READ_CACHE: dict[tuple[str, float, Profile2D], tuple[torch.Tensor, Frame, tuple[int, int]]] = {}
READ_CACHE_IMAGES = 5000  # images kept per process, so repeated runs (seeds, sweeps) decode each file once

DEFAULT_AUGMENT = {
    "flip": 0.5,
    "degrees": 5.0,
    "translate": 0.05,
    "scale": [0.9, 1.1],
    "brightness": 0.2,
    "contrast": 0.2,
}


@dataclass(frozen=True)
class Frame:
    """How an image's pixel coordinates map onto the network's input: ``x' = x * scale_x + offset_x`` (and y)."""

    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def forward(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (n, 4) xyxy from image pixels to network pixels."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        return b * s + o

    def inverse(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (n, 4) xyxy from network pixels back to image pixels."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        s = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        o = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y])
        return (b - o) / s


def detection_profile(profile: str | Profile2D, image_size: int | list[int] | None = None) -> Profile2D:
    """A 2D profile at ``image_size`` (an int for a square, or [height, width]); refuses policies that crop."""
    base = get_profile(profile)
    if not isinstance(base, Profile2D):
        raise ProfileError(f"profile {base.name} is a 3D profile; detection needs a 2D one (e.g. gray-224)")
    if base.resize == "shorter-crop":
        raise ProfileError(f"profile {base.name} crops (shorter-crop) and would cut boxes off; use resize or letterbox")
    if image_size is None:
        return base
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if size == tuple(base.size):
        return base
    return replace(base, name=f"{base.name}@{size[0]}x{size[1]}", size=size)


def frame_of(height: int, width: int, profile: Profile2D) -> Frame:
    """The box mapping that :func:`medfm.data.images2d.preprocess2d` applies to an image of this size."""
    th, tw = profile.size
    if profile.resize == "letterbox":
        scale = min(th / height, tw / width)
        nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
        return Frame(nw / width, nh / height, (tw - nw) // 2, (th - nh) // 2)
    return Frame(tw / width, th / height)


def load_image(path: str, profile: Profile2D) -> tuple[torch.Tensor, Frame, tuple[int, int]]:
    """An image as the detector takes it: (C, H, W) float32 in [0, 1] at the profile's size, its frame and the
    original (height, width)."""
    image = read_image2d(path)
    height, width = image.array.shape[:2]
    plain = replace(profile, mean=(0.0,) * profile.channels, std=(1.0,) * profile.channels)
    return torch.from_numpy(preprocess2d(image, plain)), frame_of(height, width, profile), (height, width)


def cached_image(path: str, profile: Profile2D) -> tuple[torch.Tensor, Frame, tuple[int, int]]:
    """:func:`load_image` through a per-process cache keyed by the file (and its modification time) and profile."""
    key = (path, Path(path).stat().st_mtime, profile)
    if key not in _READ_CACHE:
        if len(_READ_CACHE) >= READ_CACHE_IMAGES:
            _READ_CACHE.pop(next(iter(_READ_CACHE)))
        _READ_CACHE[key] = load_image(path, profile)
    return _READ_CACHE[key]


def box_transform(augment: dict | None) -> object | None:
    """The training view: torchvision v2 flip, affine and brightness/contrast on image + boxes (None: no changes)."""
    if not augment:
        return None
    from torchvision.transforms import v2

    unknown = set(augment) - set(DEFAULT_AUGMENT) - {"vflip"}
    if unknown:
        raise ConfigError(f"augment: unknown key(s) {sorted(unknown)}; allowed {sorted(DEFAULT_AUGMENT) + ['vflip']}")
    ops = []
    if augment.get("flip"):
        ops.append(v2.RandomHorizontalFlip(p=float(augment["flip"])))
    if augment.get("vflip"):
        ops.append(v2.RandomVerticalFlip(p=float(augment["vflip"])))
    degrees, translate = float(augment.get("degrees", 0)), float(augment.get("translate", 0))
    scale = augment.get("scale")
    if degrees or translate or scale:
        ops.append(
            v2.RandomAffine(
                degrees=degrees, translate=(translate, translate) if translate else None, scale=scale or None
            )
        )
    if augment.get("brightness") or augment.get("contrast"):
        ops.append(
            v2.ColorJitter(brightness=augment.get("brightness") or None, contrast=augment.get("contrast") or None)
        )
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(ops)


class BoxImages(Dataset):
    """Images (already at the network's size) with their boxes in network pixels; training views when a transform
    is given. Items: ``image`` (C, H, W), ``boxes`` (n, 4), ``labels`` (n,) class indices, ``index``."""

    def __init__(
        self,
        images: list[torch.Tensor],
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
        indices: np.ndarray,
        transform: object | None = None,
        seed: int = 0,
    ) -> None:
        self.images, self.boxes, self.labels = images, boxes, labels
        self.indices = np.asarray(indices, dtype=int)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        entry = int(self.indices[index])
        image = self.images[entry]
        boxes = torch.as_tensor(self.boxes[entry], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(self.labels[entry], dtype=torch.int64)
        if self.transform is not None:
            from torchvision import tv_tensors

            sample = {
                "image": tv_tensors.Image(image),
                "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
                "labels": labels,
            }
            seed = int(np.random.SeedSequence([self.seed, epoch, entry]).generate_state(1)[0])
            with seeded(seed):
                sample = self.transform(sample)
            image = sample["image"].as_subclass(torch.Tensor).clamp(0, 1)
            boxes = sample["boxes"].as_subclass(torch.Tensor)
            labels = sample["labels"]
        return {"image": image, "boxes": boxes, "labels": labels, "index": torch.tensor(entry)}


def collate_boxes(items: list[dict[str, torch.Tensor]]) -> dict[str, object]:
    """A batch as torchvision detectors take it: a list of images and a list of targets (labels + 1: 0 is
    background), with the images' indices."""
    return {
        "images": [item["image"] for item in items],
        "targets": [{"boxes": item["boxes"], "labels": item["labels"] + 1} for item in items],
        "index": torch.stack([item["index"] for item in items]),
    }


class ShardSampler(Sampler):
    """Evaluation order over the ranks without padding: rank r takes r, r + world, … (each image scored once)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        rank, size = world()
        return len(range(rank, self.size, size))

    def __iter__(self):  # noqa: ANN204 - a generator of (index, epoch)
        rank, size = world()
        for index in range(rank, self.size, size):
            yield index, 0


class DetectData(pl.LightningDataModule):
    """Box manifest → checked images and boxes → train (augmented) / val / test splits of whole images.

    Args:
        manifest: a CSV/Parquet of boxes, a folder or list of images with YOLO ``.txt`` files, or a COCO json.
        format: ``auto`` (from the file), ``csv``, ``yolo`` or ``coco``; ``class_names``: class names (YOLO ids
            index them; CSV/COCO labels must be among them); default: the labels found. The resolved names are
            ``classes`` (linked to the model's ``classes``).
        profile, image_size, resize: the 2D profile (its channels, mean/std and resize policy), at ``image_size``
            (an int or [height, width]) when given.
        split_column: train/val/test per image; else seeded hold-outs (``test_size``, ``val_size``, ``split_seed``)
            stratified by each image's first class and grouped by ``group_column`` (patients) when given.
        train_fraction, fraction_seed: a seeded, stratified share of the training images (whole patients).
        augment: the training view (:data:`DEFAULT_AUGMENT`; ``null`` for none).
        on_error: ``raise`` at the first bad row, or ``skip`` (bad rows and their images go to
            ``boxes.errors.csv`` in the run folder; every good image is used).
    """

    def __init__(
        self,
        manifest: str,
        format: str = "auto",
        class_names: list[str] | None = None,
        image_root: str | None = None,
        profile: str = "gray-224",
        image_size: int | list[int] | None = None,
        split_column: str | None = None,
        group_column: str | None = None,
        split_seed: int = 0,
        test_size: float = 0.2,
        val_size: float = 0.2,
        train_fraction: float = 1.0,
        fraction_seed: int = 0,
        augment: dict | None = DEFAULT_AUGMENT,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={on_error!r}; allowed 'raise' or 'skip'")
        self.save_hyperparameters()
        self.profile = detection_profile(profile, image_size)
        self.boxes: BoxTable = read_boxes(manifest, format, class_names, image_root)
        if not self.boxes.has_boxes:
            raise MedfmError(f"manifest {manifest}: no boxes found (give box columns, YOLO .txt files or COCO json)")
        if on_error == "raise":
            self.boxes.raise_first()
        self.classes: list[str] = list(self.boxes.classes)
        extra = tuple(c for c in (split_column, group_column) if c)
        self.items: list[ImageBoxes] = self.boxes.images(extra)
        if not self.items:
            raise MedfmError(f"manifest {manifest}: no usable image ({len(self.boxes.row_errors)} bad rows)")
        self.splits = self._splits()
        self.errors: dict[int, str] = dict(self.boxes.row_errors)
        self.images: list[torch.Tensor] | None = None
        self.frames: list[Frame] = []
        self.net_boxes: list[np.ndarray] = []
        self.batch_size = batch_size

    @property
    def input_spec(self) -> dict:
        """What the detector must know of its input: size, channels, the profile's mean/std and the profile."""
        p = self.profile
        return {"size": list(p.size), "channels": p.channels, "mean": list(p.mean), "std": list(p.std)}

    def _splits(self) -> np.ndarray:
        hp = self.hparams
        table = pd.DataFrame([item.extra for item in self.items], index=range(len(self.items)))
        strata = np.array([int(item.labels[0]) if len(item.labels) else -1 for item in self.items])
        groups = table[hp.group_column].astype(str).to_numpy() if hp.group_column else None
        if hp.split_column and hp.split_column in self.boxes.table.columns:
            names = split_names(self.boxes.table, hp.split_column)
            for item in self.items:  # every row of an image must name the same split
                values = set(names.iloc[item.rows])
                if len(values) > 1:
                    raise RowError(item.rows[0], item.image_path, f"rows of this image name several splits {values}")
        splits = assign_splits(table, strata, hp.split_column, groups, hp.split_seed, hp.test_size, hp.val_size)
        if hp.train_fraction < 1:
            train = np.flatnonzero(splits == "train")
            kept = subsample(train, strata, groups, hp.train_fraction, hp.fraction_seed)
            splits = splits.astype(object)
            splits[np.setdiff1d(train, kept)] = "unused"
            splits = splits.astype(str)
        return splits

    def setup(self, stage: str | None = None) -> None:
        """Read and resize every used image once (rank 0 shows progress); bad images go aside or raise."""
        if self.images is not None:
            return
        hp = self.hparams
        images, frames, net_boxes = [], [], []
        rank, _ = world()
        with progress_bar(rank == 0 and len(self.items) > 50) as bar:
            task = bar.add_task("reading images", total=len(self.items))
            for i, item in enumerate(self.items):
                if self.splits[i] == "unused":
                    image, frame = torch.zeros(self.profile.channels, *self.profile.size), Frame(1.0, 1.0)
                else:
                    try:
                        image, frame, shape = cached_image(item.path, self.profile)
                        if shape != (item.height, item.width):
                            raise MedfmError(
                                f"image is {shape[1]}×{shape[0]}, its header said {item.width}×{item.height}"
                            )
                    except MedfmError as err:
                        reason = getattr(err, "reason", str(err))
                        if hp.on_error == "raise":
                            raise RowError(item.rows[0], item.image_path, reason) from None
                        self.errors.update({r: reason for r in item.rows})
                        self.splits[i] = "unused"
                        image, frame = torch.zeros(self.profile.channels, *self.profile.size), Frame(1.0, 1.0)
                images.append(image)
                frames.append(frame)
                net_boxes.append(frame.forward(item.boxes).astype(np.float32))
                bar.advance(task)
        self.images, self.frames, self.net_boxes = images, frames, net_boxes
        trainer = getattr(self, "trainer", None)
        if self.errors and trainer is not None and rank == 0:
            path = write_errors(self.boxes.table, self.errors, Path(trainer.default_root_dir) / "boxes.csv")
            print(f"{len(self.errors)} bad box rows left out: {path}")

    def sizes(self) -> dict[str, dict[str, int]]:
        """Images and boxes per split."""
        out = {}
        for split in ("train", "val", "test", "unused"):
            chosen = np.flatnonzero(self.splits == split)
            out[split] = {"images": len(chosen), "boxes": int(sum(len(self.items[i].labels) for i in chosen))}
        return out

    def dataset(self, split: str, train: bool = False) -> BoxImages:
        """The images of one split (training views when ``train``)."""
        assert self.images is not None, "call setup() first"
        labels = [item.labels for item in self.items]
        transform = box_transform(self.hparams.augment) if train else None
        indices = np.flatnonzero(self.splits == split)
        return BoxImages(self.images, self.net_boxes, labels, indices, transform, self.hparams.seed)

    def _loader(self, dataset: BoxImages, train: bool) -> DataLoader:
        hp = self.hparams
        if train:
            sampler: Sampler = EpochSampler(len(dataset), shuffle=True, seed=hp.seed, drop_last=True)
        else:
            sampler = ShardSampler(len(dataset))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate_boxes,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training views, equal shares per rank; an incomplete last batch is dropped."""
        dataset = self.dataset("train", train=True)
        if len(dataset) == 0:
            raise ConfigError("no training images (check the split column and train_fraction)")
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """The validation images, each on one rank."""
        return self._loader(self.dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        """The test images, each on one rank."""
        return self._loader(self.dataset("test"), train=False)
