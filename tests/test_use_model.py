"""A tiny_run checkpoint on its own: eval, predict, export, slim checkpoints, refusing unsafe files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.images import load_rgb
from src.inference.checkpoint import UnsafeCheckpointError, load_trained, read_checkpoint
from src.utils.errors import UserError
from tests import forkrun
from tests.conftest import REPO, SMALL_IMAGES, run_cli

pytestmark = pytest.mark.slow


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, in a process of its own (tests/forkrun.py)."""
    return forkrun.run(module, *args, cwd=REPO, timeout=600)


def test_train_evaluates_the_best_checkpoint_on_test(tiny_run):
    test = tiny_run["summary"]["test"]
    assert test["samples"] == 6 and 0.0 <= test["accuracy"] <= 1.0


def test_eval_metrics_equal_a_direct_computation(tiny_run):
    out = tiny_run["tmp"] / "eval"
    args = [f"ckpt_path={tiny_run['ckpt']}", f"data.root={tiny_run['data']}", "split=val", f"hydra.run.dir={out}"]
    proc = run_module("src.eval", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    loaded = load_trained(tiny_run["ckpt"])
    model, tf = loaded.model, loaded.transform
    files = sorted((tiny_run["data"] / "val").glob("*/*.png"))
    labels = torch.tensor([0 if f.parent.name == "ants" else 1 for f in files])
    with torch.inference_mode():
        log_probs = model(torch.stack([tf(load_rgb(f)) for f in files]))
    pred = log_probs.argmax(1)
    assert metrics["samples"] == len(files) == 8
    assert metrics["accuracy"] == pytest.approx((pred == labels).float().mean().item(), abs=1e-6)
    assert metrics["loss"] == pytest.approx(torch.nn.functional.nll_loss(log_probs, labels).item(), abs=1e-5)
    for c, name in enumerate(["ants", "bees"]):
        tp = int(((pred == c) & (labels == c)).sum())
        p_den, r_den = int((pred == c).sum()), int((labels == c).sum())
        per = metrics["per_class"][name]
        assert per["support"] == r_den
        assert per["precision"] == pytest.approx(tp / p_den if p_den else 0.0, abs=1e-6)
        assert per["recall"] == pytest.approx(tp / r_den, abs=1e-6)
    cm = metrics["confusion_matrix"]
    assert sum(map(sum, cm)) == 8 and [sum(row) for row in cm] == [4, 4]
    with open(out / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", "ants", "bees"] and [int(x) for x in rows[1][1:]] == cm[0]
    assert Image.open(out / "confusion_matrix.png").size[0] > 100
    assert list((out / "tensorboard").glob("events.out.tfevents*"))


def odd_images(folder: Path, source: Path) -> None:
    im = Image.open(source).convert("RGB").resize((120, 90))
    im.save(folder / "rgb.jpg")
    im.convert("L").save(folder / "gray.png")
    im.convert("RGBA").save(folder / "rgba.png")
    im.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:200])


def test_predict_rows_for_every_file_and_errors_for_broken_ones(tiny_run):
    folder = tiny_run["tmp"] / "inputs"
    folder.mkdir()
    odd_images(folder, next((tiny_run["data"] / "val" / "bees").iterdir()))
    out = tiny_run["tmp"] / "predict"
    proc = run_module(
        "src.predict", f"ckpt_path={tiny_run['ckpt']}", f"input={folder}", "top_k=2", f"hydra.run.dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 6
    assert [n for n, r in rows.items() if r["error"]] == ["broken.jpg"]
    loaded = load_trained(tiny_run["ckpt"])
    model, tf = loaded.model, loaded.transform
    for name, row in rows.items():
        if row["error"]:
            continue
        with torch.inference_mode():
            probs = model(tf(load_rgb(folder / name)).unsqueeze(0)).exp()[0]
        assert row["predicted"] == ["ants", "bees"][int(probs.argmax())]
        assert float(row["probability"]) == pytest.approx(float(probs.max()), abs=1e-5)
        top = [float(part.split(":")[1]) for part in row["top_k"].split("; ")]
        assert sum(top) == pytest.approx(1.0, abs=1e-5)  # k = all classes: probabilities sum to 1
    assert load_rgb(folder / "rotated.jpg").size == (90, 120)  # EXIF orientation applied


BUNDLE_CHECK = r"""
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image
assert "torch" not in sys.modules
folder, paths = sys.argv[1], sys.argv[2:]
meta = json.load(open(folder + "/export.json")); p = meta["preprocessing"]
session = ort.InferenceSession(folder + "/" + meta["file"])
out = []
for path in paths:  # the README's steps
    im = Image.open(path).convert("RGB")
    r, c, (w, h) = p["resize"], p["center_crop"], im.size
    im = im.resize((r, int(r * h / w)) if w <= h else (int(r * w / h), r), getattr(Image, p["interpolation"].upper()))
    left, top = round((im.width - c) / 2), round((im.height - c) / 2)
    x = np.asarray(im.crop((left, top, left + c, top + c)), np.float32) / 255
    x = (x - np.float32(p["mean"])) / np.float32(p["std"])
    log_probs = session.run(None, {meta["input_name"]: x.transpose(2, 0, 1)[None]})[0]
    out.append(np.exp(log_probs[0]).tolist())
print(json.dumps(out))
"""


@pytest.mark.parametrize("fmt", ["onnx", "torch_export", "torchscript"])
def test_export_matches_pytorch(tiny_run, fmt):
    out = tiny_run["tmp"] / f"export-{fmt}"
    proc = run_module("src.export", f"ckpt_path={tiny_run['ckpt']}", f"format={fmt}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "labels.txt").read_text().split() == ["ants", "bees"]
    assert json.loads((out / "export.json").read_text())["input"] == "N x 3 x 64 x 64"  # the checkpoint's crop
    model = load_trained(tiny_run["ckpt"]).model
    x = torch.randn(3, 3, 64, 64)  # a batch size the export never saw
    with torch.inference_mode():
        expected = model(x)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    elif fmt == "torch_export":
        with torch.inference_mode():
            got = torch.export.load(str(out / "model.pt2")).module()(x)
    else:
        with torch.inference_mode():
            got = torch.jit.load(str(out / "model.pt"))(x)
    assert got.shape == (3, 2)
    assert (got - expected).abs().max() <= 1e-4


def test_the_onnx_bundle_runs_without_torch_and_agrees_with_the_python_api(tiny_run, hymenoptera):
    """export.json + model.onnx in a process without torch (onnxruntime, numpy, PIL) against the Python API, on
    real photos of several sizes (the tiny model's classes are compared image by image)."""
    from src.inference import Classifier

    out = tiny_run["tmp"] / "export-onnx"
    if not (out / "export.json").exists():
        proc = run_module("src.export", f"ckpt_path={tiny_run['ckpt']}", "format=onnx", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "export.json").read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["output"] == "log_probs"
    assert meta["preprocessing"]["center_crop"] == 64 and meta["preprocessing"]["resize"] == 72
    assert len(meta["source_checkpoint_sha256"]) == 64
    photos = sorted((hymenoptera / "val").glob("*/*.jpg"))[::8]
    ran = subprocess.run(
        [sys.executable, "-c", BUNDLE_CHECK, str(out), *map(str, photos)], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    bundle = torch.tensor(json.loads(ran.stdout))
    api = Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict(photos, top_k=2)
    want = torch.tensor([[{t["class"]: t["probability"] for t in r["top_k"]}[c] for c in meta["classes"]] for r in api])
    assert (bundle - want).abs().max() <= 1e-4, (bundle - want).abs().max()  # torchvision's rounding, followed


def test_export_json_describes_only_what_a_resize_and_crop_can_say():
    from src.export import bundle_preprocessing

    def record(*steps: dict) -> dict:
        return {"preprocessing": {"eval_transforms": list(steps), "mean": [0.5] * 3, "std": [0.5] * 3}}

    resize = {"transform": "torchvision.transforms.Resize", "size": 256, "interpolation": 3}
    crop = {"transform": "torchvision.transforms.CenterCrop", "size": [224, 224]}
    plain = bundle_preprocessing(record(resize, crop))
    assert (plain["resize"], plain["center_crop"], plain["interpolation"]) == (256, 224, "bicubic")
    for other in (
        record({"transform": "torchvision.transforms.Grayscale", "num_output_channels": 3}, resize, crop),
        record({**resize, "size": [224, 300]}, crop),  # Resize to h x w: not a short side
        record(resize, {**crop, "size": [224, 200]}),
        record(resize),
    ):
        described = bundle_preprocessing(other)
        assert "resize" not in described and described["eval_transforms"] == other["preprocessing"]["eval_transforms"]


def test_the_readmes_onnx_snippet_runs_without_torch(tiny_run, tmp_path):
    """The README's torch-free ONNX code, run as written (a process without torch, in the export folder)."""
    from src.inference import Classifier

    readme = (REPO / "README.md").read_text()
    (snippet,) = [b.split("\n", 1)[1] for b in readme.split("```")[1::2] if "onnxruntime" in b]
    out = tiny_run["tmp"] / "export-onnx"
    if not (out / "export.json").exists():
        proc = run_module("src.export", f"ckpt_path={tiny_run['ckpt']}", "format=onnx", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    photo = tiny_run["images"][0]
    folder = tmp_path / "bundle"
    shutil.copytree(out, folder)
    shutil.copy(photo, folder / "photo.jpg")  # a PNG under the README's name: PIL reads it by content
    check = "import sys\n" + snippet + '\nassert "torch" not in sys.modules\n'
    ran = subprocess.run([sys.executable, "-c", check], cwd=folder, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict([photo])[0]["class"]


def test_slim_checkpoint_reproduces_the_full_one(tiny_run, tmp_path):
    slim_path = Path(tiny_run["ckpt"])
    slim = torch.load(slim_path, map_location="cpu", weights_only=True)
    assert "backbone_ref" in slim and not any(k.startswith("backbone.") for k in slim["state_dict"])
    model = load_trained(slim_path).model
    full = dict(slim, state_dict=model.state_dict())
    del full["backbone_ref"]
    full_path = tmp_path / "full.ckpt"
    torch.save(full, full_path)
    assert full_path.stat().st_size > 4 * slim_path.stat().st_size
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(load_trained(full_path).model(x), model(x))
    tampered = dict(slim, backbone_ref=dict(slim["backbone_ref"], sha256="0" * 64))
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(UserError, match="not the same file"):
        load_trained(tmp_path / "tampered.ckpt")


class Evil:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_checkpoint_that_would_run_code_is_refused_unrun(tiny_run, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Evil(str(sentinel))}}, evil)
    proc = run_module(
        "src.predict", f"ckpt_path={evil}", f"input={tiny_run['data'] / 'val'}", f"hydra.run.dir={tmp_path / 'out'}"
    )
    assert proc.returncode == 1
    assert "Refusing" in proc.stdout + proc.stderr and "system" in proc.stdout + proc.stderr
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "hparams",
    [
        {"_instantiator": "lightning.pytorch.cli.instantiate_module"},
        {"preprocessing": {"eval_transforms": [{"_target_": "os.system", "command": "true"}]}},
    ],
)
def test_hyperparameters_naming_code_are_refused(tmp_path, hparams):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": hparams}, path)
    with pytest.raises(UnsafeCheckpointError, match="Refusing"):
        read_checkpoint(path)


def test_a_run_resumes_from_its_slim_checkpoint(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run_dir)  # the shared run stays as it is
    proc = run_cli(
        *SMALL_IMAGES,
        "experiment=lite0_fe",
        f"data.root={tiny_run['data']}",
        "trainer.max_epochs=2",
        "ckpt_path=last",
        f"hydra.run.dir={run_dir}",
        scratch=tiny_run["tmp"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and "backbone_ref" in last
