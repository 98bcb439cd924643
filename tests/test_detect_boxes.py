"""Box manifests (CSV, YOLO, COCO) with their checks, the box ↔ image frame through resizing, splits and views."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfm.detect.boxes import detect_format, read_boxes
from medfm.detect.data import DetectData, Frame, box_transform, detection_profile, load_image
from medfm.errors import ManifestError, ProfileError, RowError


def write_image(path, height=30, width=40, value=60):
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def csv_set(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name)
    rows = [
        {"image_path": "a.png", "x_min": 1, "y_min": 2, "x_max": 11, "y_max": 12, "label": "nodule"},
        {"image_path": "a.png", "x_min": 20, "y_min": 5, "x_max": 30, "y_max": 25, "label": "mass"},
        {"image_path": "b.png", "x_min": None, "y_min": None, "x_max": None, "y_max": None, "label": None},
        {"image_path": "c.png", "x_min": 0, "y_min": 0, "x_max": 40, "y_max": 30, "label": "nodule"},
    ]
    return tmp_path, rows


def write_csv(folder, rows, name="boxes.csv"):
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def test_csv_boxes_group_by_image_with_negatives(csv_set):
    folder, rows = csv_set
    boxes = read_boxes(write_csv(folder, rows))
    assert boxes.row_errors == {}
    assert boxes.classes == ["mass", "nodule"]
    images = boxes.images()
    assert [i.image_path for i in images] == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(images[0].boxes, [[1, 2, 11, 12], [20, 5, 30, 25]])
    np.testing.assert_array_equal(images[0].labels, [1, 0])
    assert images[1].boxes.shape == (0, 4) and images[1].labels.shape == (0,)
    assert (images[0].height, images[0].width) == (30, 40)
    assert detect_format(folder / "boxes.csv") == "csv"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"x_max": 45}, "box (20, 5, 45, 25) lies outside the 40×30 image"),
        ({"y_min": 25}, "has no area"),
        ({"label": "cyst"}, "label 'cyst' is not one of the classes ['mass', 'nodule']"),
        ({"x_min": None}, "box columns must be four finite numbers or all empty"),
        ({"image_path": "missing.png"}, "file not found"),
    ],
)
def test_a_bad_row_names_row_file_and_reason_and_takes_its_image_out(csv_set, change, reason):
    folder, rows = csv_set
    rows[1].update(change)
    path = write_csv(folder, rows)
    boxes = read_boxes(path, classes=["mass", "nodule"])
    assert reason in boxes.row_errors[1]
    with pytest.raises(RowError, match=r"row 1 \(image_path=") as info:
        boxes.raise_first()
    assert reason in str(info.value)
    kept = [i.image_path for i in boxes.images()]
    if change.get("image_path") != "missing.png":
        assert "row 1 of the same image is bad" in boxes.row_errors[0]  # the image's other row goes aside too
        assert kept == ["b.png", "c.png"]
    else:
        assert kept == ["a.png", "b.png", "c.png"]  # row 1 named another (missing) image


def test_edges_a_little_outside_are_clipped(csv_set):
    folder, rows = csv_set
    rows[3].update(x_min=-0.3, x_max=40.3)  # within 1% of the width
    boxes = read_boxes(write_csv(folder, rows))
    assert boxes.row_errors == {}
    np.testing.assert_array_equal(boxes.images()[2].boxes, [[0, 0, 40, 30]])


def test_missing_columns_stop_at_once(tmp_path):
    path = write_csv(tmp_path, [{"image_path": "a.png", "x0": 1}], "plain.csv")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['x_min'"):
        read_boxes(path, format="csv")


def test_yolo_folder_boxes_in_pixels_with_negatives_and_errors(tmp_path):
    write_image(tmp_path / "one.png", height=20, width=40)
    (tmp_path / "one.txt").write_text("1 0.5 0.5 0.5 0.25\n0 0.25 0.5 0.5 1.0\n")
    write_image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("")
    write_image(tmp_path / "nolabel.png")
    write_image(tmp_path / "bad.png")
    (tmp_path / "bad.txt").write_text("0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.2 0.2\n")
    assert detect_format(tmp_path) == "yolo"
    boxes = read_boxes(tmp_path, classes=["pituitary", "meningioma", "glioma"])
    images = {i.image_path: i for i in boxes.images()}
    assert sorted(images) == ["empty.png", "one.png"]
    np.testing.assert_allclose(images["one.png"].boxes, [[10, 7.5, 30, 12.5], [0, 0, 20, 20]])
    np.testing.assert_array_equal(images["one.png"].labels, [1, 0])
    assert images["empty.png"].boxes.shape == (0, 4)
    reasons = {boxes.table["image_path"].iloc[r]: why for r, why in boxes.row_errors.items()}
    assert "no YOLO label file" in reasons["nolabel.png"] and "nolabel.txt" in reasons["nolabel.png"]
    assert reasons["bad.png"].startswith("bad.txt line 2: class id 3 is not in 0..2")


def test_yolo_list_with_a_malformed_line(tmp_path):
    write_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("0 0.5 0.5 0.2\n")
    write_csv(tmp_path, [{"image_path": "x.png", "patient_id": "p1"}], "list.csv")
    assert detect_format(tmp_path / "list.csv") == "yolo"
    boxes = read_boxes(tmp_path / "list.csv")
    assert boxes.row_errors == {0: "x.txt line 1: expected 'label x_center y_center width height', got '0 0.5 0.5 0.2'"}
    assert boxes.table["patient_id"].iloc[0] == "p1"


def test_coco_json(tmp_path):
    write_image(tmp_path / "i1.png")
    write_image(tmp_path / "i2.png")
    coco = {
        "images": [
            {"id": 7, "file_name": "i1.png", "width": 40, "height": 30, "patient_id": "p1"},
            {"id": 8, "file_name": "i2.png", "width": 40, "height": 30, "patient_id": "p2"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [2, 3, 10, 5], "category_id": 5, "iscrowd": 0},
            {"id": 2, "image_id": 7, "bbox": [20, 10, 8, 8], "category_id": 3, "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "opacity"}, {"id": 3, "name": "nodule"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    boxes = read_boxes(tmp_path / "ann.json")
    assert boxes.classes == ["nodule", "opacity"]  # in category id order
    images = boxes.images(("patient_id",))
    np.testing.assert_array_equal(images[0].boxes, [[2, 3, 12, 8], [20, 10, 28, 18]])
    np.testing.assert_array_equal(images[0].labels, [1, 0])
    assert images[1].boxes.shape == (0, 4) and images[1].extra == {"patient_id": "p2"}
    coco["annotations"][1]["category_id"] = 9
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    boxes = read_boxes(tmp_path / "ann.json")
    assert boxes.row_errors[1] == "COCO annotation id 2: category_id 9 is not among the categories"
    coco["annotations"][1]["category_id"] = 3
    coco["images"][0]["width"] = 80  # a size that is not the file's: every box of the image would be misplaced
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    boxes = read_boxes(tmp_path / "ann.json")
    assert boxes.row_errors[0] == "the manifest says the image is 80×30 but the file is 40×30: boxes would be misplaced"
    assert 1 in boxes.row_errors and 2 not in boxes.row_errors  # the image's other box goes too; i2 stays


@pytest.mark.parametrize("resize", ["resize", "letterbox"])
def test_boxes_follow_the_image_through_resizing_and_back(tmp_path, resize):
    height, width = 120, 200
    array = np.zeros((height, width), dtype=np.uint8)
    box = np.array([40, 30, 120, 90])  # x_min, y_min, x_max, y_max edges
    array[box[1] : box[3], box[0] : box[2]] = 255
    write_image_path = tmp_path / "wide.png"
    Image.fromarray(array).save(write_image_path)
    from dataclasses import replace

    profile = replace(detection_profile("gray-224", 64), resize=resize)
    image, frame, shape = load_image(str(write_image_path), profile)
    assert shape == (height, width) and image.shape == (1, 64, 64)
    mapped = frame.forward(box[None])[0]
    ys, xs = np.nonzero(image[0].numpy() > 0.5)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    np.testing.assert_allclose(found, mapped, atol=1.0)  # the bright block lands where the box mapping says
    np.testing.assert_allclose(frame.inverse(frame.forward(box[None])), box[None], atol=1e-9)
    if resize == "resize":
        assert frame == Frame(64 / 200, 64 / 120)
    else:
        assert frame.scale_x == 64 / 200 and frame.scale_y == pytest.approx(64 / 200, rel=0.02)  # 38 rows of 120
        assert (frame.offset_x, frame.offset_y) == (0, 13)  # (64 - 38) // 2 rows of padding above


def test_cropping_profiles_are_refused():
    from medfm.data.profiles import Profile2D, register_profile

    register_profile(Profile2D(name="crop-test-64", version="1", size=(64, 64), resize="shorter-crop"))
    with pytest.raises(ProfileError, match="crops"):
        detection_profile("crop-test-64")


def grouped_set(tmp_path, n=30):
    rows = []
    for i in range(n):
        write_image(tmp_path / f"{i}.png")
        rows.append(
            {
                "image_path": f"{i}.png",
                "x_min": 1,
                "y_min": 1,
                "x_max": 9,
                "y_max": 9,
                "label": "a" if i % 2 else "b",
                "patient_id": f"p{i // 3}",
            }
        )
    return write_csv(tmp_path, rows)


def test_splits_keep_patients_together_and_fractions_are_seeded(tmp_path):
    path = grouped_set(tmp_path)
    data = DetectData(str(path), group_column="patient_id", image_size=32, augment=None)
    patients = {
        s: {item.extra["patient_id"] for item, x in zip(data.items, data.splits) if x == s}
        for s in ("train", "val", "test")
    }
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    assert not (patients["val"] & patients["test"])
    half = DetectData(str(path), group_column="patient_id", image_size=32, train_fraction=0.5, fraction_seed=1)
    again = DetectData(str(path), group_column="patient_id", image_size=32, train_fraction=0.5, fraction_seed=1)
    np.testing.assert_array_equal(half.splits, again.splits)
    assert (half.splits == "unused").sum() > 0
    assert ((half.splits == "train") | (half.splits == "unused")).sum() == (data.splits == "train").sum()
    assert data.classes == ["a", "b"] and data.input_spec == {
        "size": [32, 32],
        "channels": 1,
        "mean": [0.0],
        "std": [1.0],
    }


def test_training_views_are_seeded_and_move_boxes_with_the_image(tmp_path):
    path = grouped_set(tmp_path, n=12)
    data = DetectData(str(path), image_size=32, augment={"flip": 1.0}, seed=3)
    data.setup()
    views = data.dataset("train", train=True)
    item = views[(0, 0)]
    plain = data.dataset("train")[(0, 0)]
    np.testing.assert_allclose(item["image"].numpy(), plain["image"].numpy()[..., ::-1])
    x0, y0, x1, y1 = plain["boxes"][0].tolist()
    np.testing.assert_allclose(item["boxes"][0].numpy(), [32 - x1, y0, 32 - x0, y1])
    jitter = DetectData(str(path), image_size=32, seed=3)  # the default view: flip, affine, brightness/contrast
    jitter.setup()
    a, b = jitter.dataset("train", train=True)[(1, 4)], jitter.dataset("train", train=True)[(1, 4)]
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
    np.testing.assert_array_equal(a["boxes"].numpy(), b["boxes"].numpy())
    c = jitter.dataset("train", train=True)[(1, 5)]  # another epoch, another view
    assert not np.array_equal(a["image"].numpy(), c["image"].numpy())
    with pytest.raises(ValueError, match="unknown key"):
        box_transform({"hue": 0.1})
