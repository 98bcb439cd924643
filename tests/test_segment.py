"""Segmentation: class maps, metrics with known answers, mask/image geometry checks, the encoder transfer report,
and training end to end — a 3D U-Net on synthetic spheres (Dice > 0.9 on held-out volumes, through ``medfm segment
fit``) whose predicted masks keep an oblique, anisotropic source geometry, and a 2D U-Net on discs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torchvision
import yaml
from PIL import Image

from medfm.data import profiles
from medfm.data.profiles import Profile2D
from medfm.errors import RowError
from medfm.models.backbones import resnet3d
from medfm.segment.cases import layout2d, load_cases, resize_mask2d, restore_probabilities2d
from medfm.segment.data import PatchDataset, crop
from medfm.segment.labels import ClassMap
from medfm.segment.launch import main
from medfm.segment.metrics import case_metrics, summarise
from medfm.segment.model import build_unet, freeze_encoder, init_report, initialise_encoder

SMALL3D = {"depth": 10, "widen_factor": 0.25}
DECODER = [16, 16, 8, 8, 8]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend and make small 3D convolutions 3× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- class maps ------------------------------------------------------------------------------------------------


def test_label_map_merges_lung_lobes_and_drops_unnamed_values():
    assert ClassMap.build({5: "liver"}).values == {5: 1}
    cmap = ClassMap.build(["liver", "lung"], label_map={5: "liver", 10: "lung", 14: "lung", 1: "background"})
    raw = np.array([[0, 1, 5], [10, 14, 99]])
    assert cmap.encode(raw).tolist() == [[0, 0, 1], [2, 2, 0]]
    assert cmap.num_classes == 3
    with pytest.raises(ValueError, match=r"label values \[99\] are not named"):
        ClassMap.build(["liver", "lung"], {5: "liver", 10: "lung", 14: "lung"}, unlisted="error").encode(raw)
    with pytest.raises(ValueError, match="not one of the classes"):
        ClassMap.build(["liver"], {10: "lung"})
    merged = ClassMap.build({10: "lung", 11: "lung", 5: "liver"})
    assert merged.names == ("liver", "lung") and merged.encode(np.array([10, 11, 5])).tolist() == [2, 2, 1]


# --- metrics ---------------------------------------------------------------------------------------------------


def test_dice_hd95_and_assd_known_answers_with_anisotropic_spacing():
    ref = np.zeros((4, 10, 10), int)
    pred = np.zeros_like(ref)
    ref[:, :4, :] = 1  # rows 0-3
    pred[:, 2:6, :] = 1  # rows 2-5: overlap 2 of 4 rows
    out = case_metrics(pred, ref, 3, spacing=(3.0, 1.0, 0.5))
    assert out["dice"][0] == pytest.approx(0.5)
    assert np.isnan(out["dice"][1]) and np.isnan(out["hd95"][1])  # class 2 absent from both: not scored
    assert out["hd95"][0] == pytest.approx(2.0)  # the y faces are 2 rows × 1 mm apart
    # one voxel each: every surface distance is the voxels' distance in mm, spacing in array (z, y, x) order
    ref, pred = np.zeros((6, 10, 10), int), np.zeros((6, 10, 10), int)
    ref[1, 2, 2], pred[3, 2, 3] = 1, 1
    out = case_metrics(pred, ref, 2, spacing=(3.0, 1.0, 0.5))
    expected = np.hypot(2 * 3.0, 1 * 0.5)
    assert out["dice"][0] == 0.0
    assert out["hd95"][0] == pytest.approx(expected) and out["assd"][0] == pytest.approx(expected)
    # predicted where the reference is empty: Dice 0, no distance
    out = case_metrics(pred, np.zeros_like(ref), 2, spacing=(3.0, 1.0, 0.5))
    assert out["dice"][0] == 0.0 and np.isnan(out["hd95"][0])


def test_summary_means_over_cases_with_a_bootstrap_interval():
    per_case = {"dice": np.array([[0.8, np.nan], [0.6, 1.0], [np.nan, np.nan]])}
    summary = summarise(per_case, ["a", "b"], n_bootstrap=200, seed=1)
    assert summary["dice"]["value"] == pytest.approx((0.8 + 0.8) / 2)  # case means 0.8 and 0.8; case 3 unscored
    assert summary["dice/a"]["value"] == pytest.approx(0.7) and summary["dice/a"]["n"] == 2
    assert summary["dice/b"] == {"value": 1.0, "sd": 0.0, "n": 1}
    assert summary["n"] == {"value": 2.0, "cases": 3}
    spread = summarise({"dice": np.array([[0.2], [0.4], [0.9], [1.0]])}, ["a"], n_bootstrap=500)["dice"]
    assert spread["low"] < 0.625 < spread["high"] and 0.2 <= spread["low"] and spread["high"] <= 1.0


# --- geometry --------------------------------------------------------------------------------------------------


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def test_mask_off_the_image_grid_is_a_clear_error_and_skip_keeps_good_rows(tmp_path):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, (8, 12, 10)).astype(np.int16)
    mask = np.zeros((8, 12, 10), np.uint8)
    mask[2:5, 3:7, 4:8] = 3
    _write(ct, tmp_path / "ct.nii.gz")
    _write(mask, tmp_path / "good.nii.gz")
    _write(mask, tmp_path / "shifted.nii.gz", origin=(0.0, 4.5, 0.0))
    _write(mask, tmp_path / "coarse.nii.gz", spacing=(1.0, 1.0, 3.0))
    # the same voxels stored with y reversed (as a DICOM series and a NIfTI export of its segmentation)
    flipped = _write(mask[:, ::-1, :].copy(), tmp_path / "flipped.nii.gz", origin=(0.0, 11.0, 0.0),
                     direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))  # fmt: skip
    table = pd.DataFrame(
        {
            "image_path": ["ct.nii.gz"] * 4,
            "mask_path": ["good.nii.gz", "shifted.nii.gz", flipped.name, "coarse.nii.gz"],
        }
    )
    table.to_csv(tmp_path / "m.csv", index=False)
    cmap = ClassMap.build({3: "organ"})
    with pytest.raises(RowError, match=r"row 1 \(image_path=.*ct.nii.gz\): mask .*shifted.nii.gz does not lie on "
                       r"the image's grid: origin differs by \[0.0, 4.5, 0.0\] mm"):  # fmt: skip
        load_cases(tmp_path / "m.csv", cmap, profiles.get_profile("fmcib"))
    got = load_cases(tmp_path / "m.csv", cmap, profiles.get_profile("fmcib"), on_error="skip")
    assert [c.row for c in got.cases] == [0, 2] and sorted(got.errors) == [1, 3]
    assert "spacing [1.0, 1.0, 3.0] mm vs [1.0, 1.0, 2.0] mm" in got.errors[3]
    good, reoriented = got.cases
    assert np.array_equal(good.label, (mask == 3).astype(np.int64)) and np.array_equal(reoriented.label, good.label)
    assert "reoriented" in reoriented.note
    assert good.spacing == (2.0, 1.0, 1.0)  # array (z, y, x) order
    assert good.image.shape == (1, 8, 12, 10) and good.image.dtype == np.float32
    assert np.allclose(good.image[0], (ct + 1024.0) / 3072.0)  # the fmcib window


def test_2d_masks_follow_the_profile_resize_and_come_back():
    profile = Profile2D(name="t-letterbox", version="1", size=(16, 16), resize="letterbox", channels=1,
                        mean=(0.0,), std=(1.0,))  # fmt: skip
    layout = layout2d(8, 16, profile)  # scaled to 8×16, placed 4 rows down
    label = np.zeros((8, 16), np.int64)
    label[:, 8:] = 1
    resized = resize_mask2d(label, layout)
    assert resized.shape == (16, 16) and resized[:4].sum() == 0 and resized[12:].sum() == 0
    assert np.array_equal(resized[4:12], label)
    prob = torch.nn.functional.one_hot(torch.from_numpy(resized), 2).permute(2, 0, 1).float()
    back = restore_probabilities2d(prob, layout).argmax(dim=0).numpy()
    assert np.array_equal(back, label)


def test_patches_are_seeded_and_centred_on_foreground():
    from medfm.segment.cases import Case

    label = np.zeros((20, 20, 20), np.int64)
    label[15:18, 2:5, 10:13] = 1
    case = Case(np.random.default_rng(0).normal(size=(1, 20, 20, 20)).astype(np.float32), label, (1.0,) * 3, 0)
    data = PatchDataset([case], np.array([0]), (8, 8, 8), samples_per_case=20, foreground_fraction=1.0, seed=3)
    items = [data[(i, 0)] for i in range(20)]
    assert all(item["label"].sum() > 0 for item in items) and items[0]["image"].shape == (1, 8, 8, 8)
    assert torch.equal(data[(5, 0)]["image"], items[5]["image"])
    assert not torch.equal(data[(5, 1)]["image"], items[5]["image"])
    assert crop(np.arange(5), np.array([-2]), (4,), -1).tolist() == [-1, -1, 0, 1]


# --- encoder transfer ------------------------------------------------------------------------------------------


def test_2d_resnet_weights_fill_the_encoder_and_leave_the_decoder_at_init():
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None).state_dict()
    torch.manual_seed(2)
    net = build_unet("resnet18", None, 3, 2, DECODER)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = initialise_encoder(net, "resnet18", {"state_dict": source}, min_coverage=0.99)
    assert report.coverage == 1.0 and report.unused == ["fc.bias", "fc.weight"]
    assert set(report.blocks) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert all(share == 1.0 for share in report.blocks.values())
    assert torch.equal(net.encoder.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    for key, value in net.state_dict().items():
        if not key.startswith("encoder."):
            assert torch.equal(value, before[key]), key
    summary = init_report(net, "ckpt", report)
    assert summary.encoder_coverage == 1.0 and summary.to_dict()["decoder"]["coverage"] == 0.0
    assert summary.encoder_values + summary.decoder_values == sum(v.numel() for v in before.values())
    assert freeze_encoder(net, "encoder-until-layer1") == ["conv1", "bn1", "relu", "maxpool", "layer1"]
    assert not net.encoder.layer1[0].conv1.weight.requires_grad and net.encoder.layer2[0].conv1.weight.requires_grad


def test_3d_resnet_weights_fill_the_encoder_and_2d_weights_inflate(tmp_path):
    torch.manual_seed(3)
    trunk = resnet3d(**SMALL3D, in_channels=1)
    path = tmp_path / "trunk3d.pt"
    torch.save({"state_dict": {f"model.trunk.{k}": v for k, v in trunk.state_dict().items()}}, path)
    net = build_unet("resnet3d", SMALL3D, 1, 2, DECODER)
    report = initialise_encoder(net, "resnet3d", str(path), min_coverage=0.99)
    assert report.coverage == 1.0 and report.left_at_init == [] and report.mismatched == []
    assert torch.equal(net.encoder.layer3[0].conv2.weight, trunk.layer3[0].conv2.weight)
    assert init_report(net, str(path), report).to_dict()["model_coverage"] < 1.0
    # a 2D torchvision ResNet18 into a 3D ResNet18 encoder: inflated (and its RGB conv summed to one channel)
    net18 = build_unet("resnet3d", {"depth": 18}, 1, 2, DECODER)
    source = torchvision.models.resnet18(weights=None).state_dict()
    report = initialise_encoder(net18, "resnet3d", {"state_dict": source}, inflate=True)
    adapted = dict(report.adapted)
    assert adapted["conv1.weight"] == "summed 3→1 input channels; inflated 2D→3D over depth 7"
    assert report.blocks["layer2"] > 0.99  # only MONAI's downsample biases stay at init


# --- training end to end ---------------------------------------------------------------------------------------


def _spheres(folder: Path, n: int, size: int = 24, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    zz, yy, xx = np.mgrid[:size, :size, :size]
    for _ in range(n):
        centre, radius = rng.uniform(size * 0.35, size * 0.65, 3), rng.uniform(5.0, 7.0)
        inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        out.append(((rng.normal(0, 100, inside.shape) + 400 * inside).astype(np.int16), inside.astype(np.uint8) * 2))
    return out


@pytest.fixture(scope="module")
def sphere_run(tmp_path_factory) -> Path:
    """`medfm segment fit` on 6 + 2 + 2 synthetic sphere volumes (24³ voxels at 1×1×2 mm): the run's log folder."""
    folder = tmp_path_factory.mktemp("spheres")
    rows = []
    for i, (ct, mask) in enumerate(_spheres(folder, 10)):
        _write(ct, folder / f"ct{i}.nii.gz")
        _write(mask, folder / f"mask{i}.nii.gz")
        split = "train" if i < 6 else "val" if i < 8 else "test"
        rows.append({"image_path": f"ct{i}.nii.gz", "mask_path": f"mask{i}.nii.gz", "patient": f"P{i}", "split": split})
    pd.DataFrame(rows).to_csv(folder / "spheres.csv", index=False)
    config = {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(folder / "run"), "max_epochs": 6, "accelerator": "cpu", "devices": 1,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0},
        "model": {"encoder": "resnet3d", "encoder_args": SMALL3D, "decoder_channels": DECODER, "lr_encoder": 3e-3,
                  "lr_decoder": 3e-3, "n_bootstrap": 200},
        "data": {"manifest": str(folder / "spheres.csv"), "classes": {2: "sphere"}, "hu_window": [-300, 700],
                 "split_column": "split", "group_column": "patient", "patch_size": [24, 24, 24],
                 "samples_per_case": 4, "flip_axes": [0, 1, 2], "batch_size": 2},
    }  # fmt: skip
    (folder / "seg.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(folder / "seg.yaml")]) == 0
    return next((folder / "run").rglob("model.json")).parent


def test_3d_unet_segments_held_out_spheres(sphere_run):
    run = sphere_run
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["dice"]["value"] > 0.9
    assert results["test"]["dice"]["low"] <= results["test"]["dice"]["value"] <= results["test"]["dice"]["high"]
    assert results["sizes"] == {"train": 6, "val": 2, "test": 2, "unused": 0}
    assert results["test"]["hd95/sphere"]["value"] < 3.0  # mm
    assert results["encoder_coverage"] == 0.0 and results["init"] == "random"
    curves = pd.read_csv(run / "curves.csv")
    assert list(curves["epoch"]) == list(range(6)) and curves["val/dice"].max() > 0.85
    card = json.loads((run / "model.json").read_text())
    assert card["kind"] == "medfm-segmenter" and card["classes"] == ["sphere"]
    assert pd.read_csv(run / "test_cases.csv")["row"].tolist() == [8, 9]
    splits = pd.read_csv(run / "splits.csv")  # every manifest row with its split and its own columns
    assert splits["fit_split"].tolist() == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert splits["patient"].tolist() == [f"P{i}" for i in range(10)]


def test_predicted_masks_keep_an_oblique_anisotropic_geometry(sphere_run, tmp_path):
    ct, mask = _spheres(tmp_path, 1, seed=7)[0]
    angle = np.deg2rad(20)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    # the x axis reversed too: the model sees the volume turned to LPS order, the mask must come back
    direction = tuple(np.asarray(direction).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0]).ravel().reshape(3, 3))
    direction = tuple(float(v) for v in np.asarray(direction).ravel())
    source = _write(ct, tmp_path / "oblique.nii.gz", spacing=(1.0, 1.0, 2.0), origin=(-12.5, 40.25, 7.0),
                    direction=direction)  # fmt: skip
    pd.DataFrame({"image_path": [source.name], "id": ["a"]}).to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "pred"
    card = sphere_run / "model.json"
    assert main(["predict", str(card), str(tmp_path / "new.csv"), "--out", str(out), "--overlays", "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert table["id"].tolist() == ["a"]
    written = sitk.ReadImage(str(out / table["mask_file"][0]))
    original = sitk.ReadImage(str(source))
    assert written.GetSize() == original.GetSize()
    assert np.allclose(written.GetSpacing(), original.GetSpacing())
    assert np.allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    predicted = sitk.GetArrayFromImage(written)
    truth = mask > 0
    dice = 2 * np.sum((predicted == 1) & truth) / (np.sum(predicted == 1) + np.sum(truth))
    assert dice > 0.85
    assert table["volume_ml/sphere"][0] == pytest.approx(np.sum(predicted == 1) * 2.0 / 1000)
    assert (out / table["overlay_file"][0]).stat().st_size > 1000


def test_overlays_draw_the_manifests_reference_mask_beside_the_prediction(sphere_run, tmp_path, monkeypatch):
    import medfm.segment.predict as predict_module

    figures = []
    monkeypatch.setattr(predict_module, "write_figure", lambda fig, dest, dpi=90: figures.append(fig) or Path(dest))
    folder = next(p for p in sphere_run.parents if (p / "spheres.csv").is_file())
    test_rows = pd.read_csv(folder / "spheres.csv").iloc[8:]
    test_rows.to_csv(folder / "test_rows.csv", index=False)  # beside the volumes its paths name
    out = tmp_path / "pred"
    assert main(["predict", str(sphere_run / "model.json"), str(folder / "test_rows.csv"), "--out", str(out),
                 "--overlays", "--quiet"]) == 0  # fmt: skip
    assert len(figures) == 2
    for fig in figures:
        assert [ax.get_title().split(" · ")[0] for ax in fig.axes] == ["prediction"] * 3 + ["reference"] * 3
        for top, bottom in zip(fig.axes[:3], fig.axes[3:]):  # the same slices: the reference agrees with the model
            predicted = np.ma.filled(top.images[1].get_array(), 0) > 0
            reference = np.ma.filled(bottom.images[1].get_array(), 0) > 0
            assert 2 * np.sum(predicted & reference) / (predicted.sum() + reference.sum()) > 0.8


def test_2d_unet_on_discs_and_predict_back_to_image_size(tmp_path, monkeypatch):
    profiles.register_profile(
        Profile2D(name="gray-48-test", version="1", size=(48, 48), channels=1, mean=(0.0,), std=(1.0,))
    )
    rng = np.random.default_rng(0)
    rows = []
    yy, xx = np.mgrid[:56, :64]
    for i in range(14):
        cy, cx, r = rng.uniform(18, 38), rng.uniform(18, 46), rng.uniform(8, 13)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = np.clip(60 + 120 * disc + rng.normal(0, 25, disc.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(tmp_path / f"mask{i}.png")
        split = "train" if i < 10 else "val" if i < 12 else "test"
        rows.append({"image_path": f"img{i}.png", "mask_path": f"mask{i}.png", "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "discs.csv", index=False)
    args = [
        "fit", "--seed_everything=0", "--trainer.max_epochs=8", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--model.encoder=resnet18", "--model.in_channels=1",
        f"--model.decoder_channels={DECODER}", "--model.lr_encoder=3e-3", "--model.lr_decoder=3e-3",
        "--model.n_bootstrap=100", f"--data.manifest={tmp_path / 'discs.csv'}", "--data.classes={255: disc}",
        "--data.profile=gray-48-test", "--data.split_column=split", "--data.samples_per_case=2",
        "--data.flip_axes=[0, 1]", "--data.batch_size=4",
    ]  # fmt: skip
    assert main(args) == 0
    run = next((tmp_path / "run").rglob("model.json")).parent
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["dice"]["value"] > 0.9
    out = tmp_path / "pred"
    assert main(["predict", str(run / "model.json"), str(tmp_path / "discs.csv"), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    table = pd.read_csv(out / "predictions.csv")
    mask = np.asarray(Image.open(out / table["mask_file"][13]))
    truth = np.asarray(Image.open(tmp_path / "mask13.png")) > 0
    assert mask.shape == (56, 64)
    assert 2 * np.sum((mask == 1) & truth) / (np.sum(mask == 1) + np.sum(truth)) > 0.85

    # interrupted after 4 rows, then resumed: only the other 10 rows are segmented, and the table is the same
    import medfm.segment.predict as predict_module

    original, calls = predict_module._predict2d, []

    def interrupted(*args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(args[1])
        return original(*args, **kwargs)

    again = tmp_path / "again"
    monkeypatch.setattr(predict_module, "_predict2d", interrupted)
    command = ["predict", str(run / "model.json"), str(tmp_path / "discs.csv"), "--out", str(again), "--quiet"]
    assert main(command) == 130 and not (again / "predictions.csv").exists()
    assert len(list((again / "predictions.partial").glob("row-*.json"))) == 4
    calls.clear()
    monkeypatch.setattr(predict_module, "_predict2d", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    assert main([*command, "--resume"]) == 0
    assert len(calls) == 10 and not (again / "predictions.partial").exists()
    pd.testing.assert_frame_equal(pd.read_csv(again / "predictions.csv"), table)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "segment").glob("*.yaml")))
def test_the_segment_configs_parse(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--data.manifest", "dummy.csv", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    chosen = yaml.safe_load(path.read_text())
    for section in ("model", "data"):
        for key, value in chosen[section].items():
            if key == "manifest":
                continue
            got = printed[section][key]
            if isinstance(value, dict):
                got, value = {str(k): v for k, v in got.items()}, {str(k): v for k, v in value.items()}
            assert got == value, f"{path.name}: {section}.{key}"
    ClassMap.build(chosen["data"]["classes"], chosen["data"].get("label_map"))  # the class spec is valid
