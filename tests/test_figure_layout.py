"""Figures a paper can use, checked on the matplotlib figure each writer hands to ``write_figure`` (not on pixels):
saliency colour bars, segmentation overlays with the reference mask, detection labels that do not overlap, titled
training curves."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medfm.data.outputs import pyplot


@pytest.fixture
def captured(monkeypatch):
    """Every figure passed to ``write_figure`` by the modules under test (drawn, not written)."""
    figures: list = []

    def keep(fig, dest, dpi=120):
        fig.canvas.draw()
        figures.append((fig, Path(dest)))
        return Path(dest)

    import medfm.analyze.report as report
    import medfm.detect.outputs as detect_outputs
    import medfm.segment.predict as segment_predict
    import medfm.train.curves as curves

    for module in (report, detect_outputs, segment_predict, curves):
        monkeypatch.setattr(module, "write_figure", keep)
    yield figures
    for fig, _ in figures:
        pyplot().close(fig)


def test_saliency_overlays_carry_one_colour_bar_per_map_with_its_range(captured, tmp_path):
    from medfm.analyze.figures import save_overlays

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 8, 10, 12))
    maps = {"occlusion": rng.uniform(0.0, 2.5, (8, 10, 12)), "gradcam": rng.uniform(-1.0, 1.0, (8, 10, 12))}
    save_overlays(tmp_path / "o.png", image, maps, "model · row 3")
    ((fig, dest),) = captured
    assert dest.name == "o.png"
    images = [ax for ax in fig.axes if ax.get_title()]
    bars = [ax for ax in fig.axes if ax not in images]
    assert len(images) == 3 * 3 and len(bars) == 2  # input, two maps × three planes; a colour bar per map
    for bar, (name, value) in zip(bars, maps.items()):
        assert bar.get_ylabel() == name
        low, high = bar.get_ylim()
        assert low == pytest.approx(value.min()) and high == pytest.approx(value.max())
    assert fig._suptitle.get_text() == "model · row 3"


def test_segmentation_overlay_shows_the_reference_mask_beside_the_prediction(captured, tmp_path):
    from medfm.segment.predict import _overlay

    image = np.zeros((20, 20))
    predicted, reference = np.zeros((20, 20), int), np.zeros((20, 20), int)
    predicted[5:12, 5:12], reference[6:14, 6:14] = 1, 1
    slices = [(image, predicted, "axial z=3"), (image, predicted, "coronal y=4")]
    _overlay(slices, ["lesion"], tmp_path / "0000_ct_overlay.png", [reference, reference])
    _overlay(slices, ["lesion"], tmp_path / "0001_ct_overlay.png")
    (with_ref, _), (without, _) = captured
    titles = [ax.get_title() for ax in with_ref.axes]
    assert titles == [
        "prediction · axial z=3", "prediction · coronal y=4", "reference · axial z=3", "reference · coronal y=4"
    ]  # fmt: skip
    shown = with_ref.axes[2].images[1].get_array()  # the reference panel's mask layer is the reference itself
    assert np.array_equal(np.ma.filled(shown, 0), reference)
    assert len(with_ref.axes[2].collections) == 1  # the prediction's outline over the reference
    assert "reference mask" in with_ref._suptitle.get_text()
    assert [ax.get_title() for ax in without.axes] == ["axial z=3", "coronal y=4"]
    assert [t.get_text() for t in with_ref.legends[0].get_texts()] == ["1 lesion"]


def _extents(fig) -> list:
    renderer = fig.canvas.get_renderer()
    return [t.get_bbox_patch().get_window_extent(renderer) for t in fig.axes[0].texts]


def test_detection_labels_do_not_overlap_and_stay_in_the_image(captured, tmp_path):
    from medfm.detect.outputs import _draw

    Image.fromarray(np.full((64, 96), 90, np.uint8)).save(tmp_path / "xr.png")
    # three nearly identical predictions, one at the top edge and a reference box under them: every default
    # place (the top-left corner of each box) would put the labels on top of each other
    predicted = pd.DataFrame(
        {
            "image_path": "xr.png",
            "x_min": [20.0, 21.0, 20.5, 60.0],
            "y_min": [20.0, 21.0, 19.5, 0.0],
            "x_max": [40.0, 41.0, 40.5, 95.0],
            "y_max": [40.0, 41.0, 39.5, 10.0],
            "label": ["nodule", "nodule", "mass", "nodule"],
            "score": [0.91, 0.85, 0.40, 0.77],
        }
    )
    truth = np.array([[19.0, 19.0, 41.0, 42.0]])
    _draw(str(tmp_path / "xr.png"), tmp_path / "o.png", predicted, truth, ["nodule"])
    ((fig, _),) = captured
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["nodule", "nodule 0.91", "nodule 0.85", "nodule 0.77", "mass 0.40"]
    boxes = _extents(fig)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    image = fig.axes[0].get_window_extent()
    for box in boxes:
        assert image.x0 - 0.5 <= box.x0 and box.x1 <= image.x1 + 0.5
        assert image.y0 - 0.5 <= box.y0 and box.y1 <= image.y1 + 0.5
    assert len(fig.axes[0].patches) == 5 and "xr.png" in fig._suptitle.get_text()


def test_place_labels_stagger_identical_boxes_inside_the_image():
    from medfm.detect.outputs import place_labels

    corners = place_labels([(0.0, 0.0, 10.0, 10.0)] * 4, [(8.0, 3.0)] * 4, 12.0, 40.0)
    rects = [(x, y, x + 8.0, y + 3.0) for x, y in corners]
    assert all(0 <= r[0] and r[2] <= 12.0 and 0 <= r[1] and r[3] <= 40.0 for r in rects)
    for a, b in itertools.combinations(rects, 2):
        assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    assert corners[0] == (0.0, 0.0)  # above the box is off the image: clipped to its top edge


def test_training_curves_are_titled_with_model_and_task(captured, tmp_path):
    from medfm.train.curves import write_curves

    history = [{"epoch": 0, "val/auroc": 0.6, "val/loss": 0.7, "train/loss": 0.8},
               {"epoch": 1, "val/auroc": 0.7, "val/loss": 0.6, "train/loss": 0.5}]  # fmt: skip
    csv, png = write_curves(history, tmp_path, "fine-tune resnet3d (random) · binary: malignant · ft.csv")
    ((fig, dest),) = captured
    assert dest == png == tmp_path / "curves.png" and csv.is_file()
    assert fig._suptitle.get_text() == "fine-tune resnet3d (random) · binary: malignant · ft.csv"
    assert [ax.get_title() for ax in fig.axes] == ["validation metrics", "losses"]
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.6, 0.7]
