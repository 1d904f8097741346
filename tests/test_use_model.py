"""A tiny_run checkpoint on its own: eval, predict, export, slim checkpoints, refusing unsafe files."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    Image.open(folder / "rgb.jpg").save(folder / "anim.gif")  # a type training passes over: a row saying so
    (tiny_run["tmp"] / "elsewhere").mkdir()
    shutil.copy(folder / "rgb.jpg", tiny_run["tmp"] / "elsewhere" / "linked.jpg")
    os.symlink(tiny_run["tmp"] / "elsewhere", folder / "more")  # a symlinked subfolder: followed, as training does
    out = tiny_run["tmp"] / "predict"
    proc = run_module(
        "src.predict", f"ckpt_path={tiny_run['ckpt']}", f"input={folder}", "top_k=2", f"hydra.run.dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == 8 and rows["linked.jpg"]["predicted"] in ("ants", "bees")
    assert [n for n, r in rows.items() if r["error"]] == ["anim.gif", "broken.jpg"]
    assert (
        rows["anim.gif"]["error"].startswith("ignored: .gif is not an image type") and not rows["anim.gif"]["predicted"]
    )
    rows.pop("anim.gif"), rows.pop("linked.jpg")
    (folder / "more" / "loop").symlink_to(folder)
    proc = run_module("src.predict", f"ckpt_path={tiny_run['ckpt']}", f"input={folder}", f"hydra.run.dir={out}2")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "leads back to" in said and "Traceback" not in said
    (folder / "more" / "loop").unlink()
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


BUNDLE_FILES = ("model.onnx", "labels.txt", "export.json")
# the README's code (its one block that uses onnxruntime), run as written on each image in turn, copied to
# photo.jpg in the bundle's folder, in a process without torch (its one ONNX session made once); prints
# {image: probabilities}
RECIPE_RUNNER = r"""
import json, shutil, sys
import numpy as np, onnxruntime as ort
snippet, probs, sessions, session = sys.argv[1], {}, {}, ort.InferenceSession
ort.InferenceSession = lambda path, *a, **k: sessions.get(path) or sessions.setdefault(path, session(path, *a, **k))
for image in sys.argv[2:]:
    shutil.copy(image, "photo.jpg")
    scope = {}
    exec(snippet, scope)
    out = scope["out"]  # N x classes log-probabilities
    probs[image] = np.exp(out[0].astype(np.float64)).tolist()
assert "torch" not in sys.modules
print(json.dumps(probs))
"""


def readme_recipe(readme: Path = REPO / "README.md") -> str:
    """The one ```python block of ``readme`` that uses onnxruntime (the acceptance check takes the first one)."""
    blocks = [b.split("\n", 1)[1] for b in readme.read_text().split("```")[1::2] if b.startswith("python")]
    (snippet,) = [b for b in blocks if "onnxruntime" in b]
    assert blocks[0] == snippet, "the torch-free recipe must be README's first python block"
    return snippet


def recipe_probabilities(bundle: Path, images: list[Path], scratch: Path) -> dict[str, list[float]]:
    """The README recipe's probabilities per image on a copy of ``bundle`` (its photo.jpg is overwritten)."""
    folder = scratch / f"run-{bundle.name}"
    shutil.copytree(bundle, folder, dirs_exist_ok=True)
    ran = subprocess.run(
        [sys.executable, "-c", RECIPE_RUNNER, readme_recipe(), *map(str, images)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def default_export(tiny_run: dict) -> Path:
    """tiny_run's checkpoint exported to ONNX with the defaults, once per session."""
    out = tiny_run["tmp"] / "export-onnx"
    if not (out / "export.json").exists():
        proc = run_module("src.export", f"ckpt_path={tiny_run['ckpt']}", "format=onnx", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def hard_images(folder: Path, photos: list[Path]) -> dict[str, list[Path]]:
    """Files the API prepares beyond resize and crop, made from real photos: a 16-bit greyscale PNG (scaled,
    not clipped), JPEGs with EXIF orientations, large JPEGs (decoded in PIL's draft mode at 1/2 and 1/4)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, list[Path]] = {"plain": [], "16-bit": [], "exif": [], "large": []}
    for i, photo in enumerate(photos):
        im = Image.open(photo).convert("RGB")
        cases["plain"].append(photo)
        wide = np.asarray(im.convert("L"), np.uint16) * 257  # the full 16-bit range
        Image.fromarray(wide).save(folder / f"grey16_{i}.png")
        cases["16-bit"].append(folder / f"grey16_{i}.png")
        for orientation in (3, 6, 8):
            exif = Image.Exif()
            exif[0x0112] = orientation
            im.save(folder / f"exif{orientation}_{i}.jpg", exif=exif, quality=92)
            cases["exif"].append(folder / f"exif{orientation}_{i}.jpg")
        for scale in (4, 6):  # short sides ~1,500 and ~2,250 px: draft scales 1/2 and 1/4
            exif = Image.Exif()
            exif[0x0112] = 6 if scale == 6 else 1  # drafted and rotated
            big = im.resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC)
            big.save(folder / f"large{scale}_{i}.jpg", exif=exif, quality=92)
            cases["large"].append(folder / f"large{scale}_{i}.jpg")
    return cases


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


def test_the_readme_recipe_agrees_with_the_python_api_on_every_kind_of_file(tiny_run, hymenoptera, tmp_path):
    """The README's torch-free recipe on model.onnx + export.json against Classifier.predict: real photos of
    several sizes, and made from them a 16-bit greyscale PNG, EXIF-rotated JPEGs and large JPEGs (draft mode)."""
    from src.inference import Classifier

    bundle = default_export(tiny_run)
    meta = json.loads((bundle / "export.json").read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["output"] == "log_probs"
    assert meta["preprocessing"]["center_crop"] == 64 and meta["preprocessing"]["resize"] == 72
    assert len(meta["source_checkpoint_sha256"]) == 64
    cases = hard_images(tmp_path / "images", sorted((hymenoptera / "val").glob("*/*.jpg"))[::80])
    images = [image for paths in cases.values() for image in paths]
    recipe = recipe_probabilities(bundle, images, tmp_path)
    api = Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict(images, top_k=2)
    diffs = {}
    for image, result in zip(images, api, strict=True):
        want = {t["class"]: t["probability"] for t in result["top_k"]}
        case = next(name for name, paths in cases.items() if image in paths)
        worst = max(abs(want[c] - p) for c, p in zip(meta["classes"], recipe[str(image)], strict=True))
        diffs[case] = max(diffs.get(case, 0.0), worst)
    assert max(diffs.values()) <= 1e-4, diffs  # onnxruntime vs PyTorch: ~1e-6; a step missed: 1e-3 and up


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

    snippet = readme_recipe()
    photo = tiny_run["images"][0]
    folder = tmp_path / "bundle"
    shutil.copytree(default_export(tiny_run), folder)
    shutil.copy(photo, folder / "photo.jpg")  # a PNG under the README's name: PIL reads it by content
    check = "import sys\n" + snippet + '\nassert "torch" not in sys.modules\n'
    ran = subprocess.run([sys.executable, "-c", check], cwd=folder, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict([photo])[0]["class"]


def test_the_manuals_recipe_is_the_readmes():
    """docs/using-a-model.md shows the same code as the README (the tests run the README's)."""
    assert readme_recipe(REPO / "docs" / "using-a-model.md") == readme_recipe()


def test_export_json_describes_the_apis_decoding_steps_as_plain_values():
    """Before resize and crop, export.json lists what load_rgb does, with its values: draft decoding of large
    JPEGs at the API's decode_min_side, EXIF orientation, wide greyscale scaled (its table, under the rule the
    README's code applies, gives to_rgb's pixels in every wide mode)."""
    from omegaconf import OmegaConf

    from src.data.images import to_rgb
    from src.export import bundle_preprocessing
    from src.inference import Classifier

    resize = {"transform": "torchvision.transforms.Resize", "size": 256, "interpolation": 2}
    crop = {"transform": "torchvision.transforms.CenterCrop", "size": 224}
    hparams = {"preprocessing": {"eval_transforms": [resize, crop], "mean": [0.5] * 3, "std": [0.5] * 3}}
    decode_min_side = OmegaConf.load(REPO / "conf" / "export.yaml").decode_min_side
    assert decode_min_side == Classifier.decode_min_side == 512  # the API's default
    p = bundle_preprocessing(hparams, decode_min_side=decode_min_side)
    steps = ["decode_min_side", "exif_transpose", "wide_greyscale", "rgb", "resize", "center_crop", "normalize"]
    assert p["steps"] == steps
    assert p["decode_min_side"] == 512 and p["exif_transpose"] is True and set(p["rules"]) >= set(p["steps"])
    assert set(p["wide_greyscale"]) == {"I;16", "I;16B", "I;16L", "I;16N", "I"}
    byte_order = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "=i4"}
    for mode, tops in p["wide_greyscale"].items():
        for values in ([0, 7, 128, 255], [0, 255, 3000, 65535], [0, 70000]):
            if mode != "I" and max(values) > 65535:
                continue
            im = Image.frombytes(mode, (len(values), 1), np.array(values, byte_order[mode]).tobytes())
            full = next((t for t in tops if max(values) <= t), tops[-1])
            want = np.clip(np.array(values, np.float64) / full * 255 + 0.5, 0, 255).astype(np.uint8)
            assert (np.asarray(to_rgb(im))[0] == want[:, None]).all(), (mode, values)
    with pytest.raises(UserError, match="image_size"):  # transforms export.json can't rescale
        bundle_preprocessing({"preprocessing": {**hparams["preprocessing"], "eval_transforms": [crop]}}, 160)


def test_atomic_path_renames_a_finished_file_into_place_and_drops_a_failed_one(tmp_path):
    from src.utils.io import atomic_path, current_umask

    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter failed"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.") and tmp.suffix == ".onnx"
        tmp.write_bytes(b"half")
        raise RuntimeError("the exporter failed")
    assert target.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["model.onnx"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing at the final name until the block ends
    assert target.read_bytes() == b"new" and [f.name for f in tmp_path.iterdir()] == ["model.onnx"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600


def earlier_export(folder: Path) -> Path:
    """A folder holding an earlier export (a stand-in bundle: its files are told apart by their bytes)."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"an earlier export's model")
    (folder / "labels.txt").write_text("cats\ndogs\n")
    (folder / "export.json").write_text(json.dumps({"file": "model.onnx", "classes": ["cats", "dogs"]}))
    return folder


# src.export whose ONNX exporter is killed (SIGKILL) halfway through writing its file
KILLED_MID_WRITE = r"""
import os, runpy, signal, torch
def torn(model, args, f, **options):
    with open(f, "wb") as out:
        out.write(b"half an ONNX file")
    os.kill(os.getpid(), signal.SIGKILL)
torch.onnx.export = torn
runpy.run_module("src.export", run_name="__main__", alter_sys=True)
"""


def test_a_reexport_killed_mid_write_leaves_no_torn_model_beside_an_old_export_json(tiny_run, tmp_path):
    folder = earlier_export(tmp_path / "bundle")
    old_model = (folder / "model.onnx").read_bytes()
    args = (f"ckpt_path={tiny_run['ckpt']}", "format=onnx", f"hydra.run.dir={folder}")
    proc = forkrun.run(f"-c:{KILLED_MID_WRITE}", *args, cwd=REPO, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (folder / "export.json").exists()  # the folder says its export is incomplete
    assert (folder / "model.onnx").read_bytes() == old_model  # the earlier model, whole
    torn = [f.name for f in folder.iterdir() if f.is_file() and f.read_bytes() == b"half an ONNX file"]
    assert len(torn) == 1 and torn[0].startswith(".model.onnx."), torn  # only under a hidden temporary name


# src.export with every write, rename and removal in the folder $BUNDLE recorded (an audit hook) to $AUDIT_LOG
AUDITED_EXPORT = r"""
import atexit, json, os, runpy, sys
folder, events = os.environ["BUNDLE"], []
def name(path):
    if path is None or isinstance(path, int):
        return None
    full = os.path.realpath(os.fsdecode(path))
    return os.path.basename(full) if os.path.dirname(full) == folder else None
def hook(event, args):
    if event == "open" and name(args[0]):
        writes = (args[1] and any(c in args[1] for c in "wax+")) or (args[2] or 0) & (os.O_WRONLY | os.O_RDWR)
        if writes:
            events.append(["write", name(args[0])])
    elif event == "os.rename" and name(args[1]):
        events.append(["rename", name(args[0]), name(args[1])])
    elif event == "os.remove" and name(args[0]):
        events.append(["remove", name(args[0])])
sys.addaudithook(hook)
atexit.register(lambda log=os.environ["AUDIT_LOG"], text=lambda: json.dumps(events): open(log, "w").write(text()))
runpy.run_module("src.export", run_name="__main__", alter_sys=True)
"""


def test_a_reexport_at_another_image_size_is_renamed_into_place_and_consistent(tiny_run, tmp_path):
    """src.export image_size=48 (the checkpoint: resize 72, crop 64) into a folder holding an earlier export,
    every write, rename and removal there recorded: the earlier export.json goes first, each bundle file appears
    by a rename from a hidden name beside it, export.json last; export.json resizes to round(72 * 48 / 64) = 54
    and crops 48, the README's code runs on it in onnxruntime and gives what PyTorch gives after those steps;
    the log says the preprocessing differs from the checkpoint's."""
    from src.data.preprocessing import transform_from_record

    folder = earlier_export(tmp_path / "bundle")
    log = tmp_path / "audit.json"
    env = {**os.environ, "BUNDLE": str(folder.resolve()), "AUDIT_LOG": str(log)}
    args = (f"ckpt_path={tiny_run['ckpt']}", "format=onnx", "image_size=48", f"hydra.run.dir={folder}")
    proc = forkrun.run(f"-c:{AUDITED_EXPORT}", *args, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [e for e in json.loads(log.read_text()) if e[-1] in BUNDLE_FILES]
    assert events[0] == ["remove", "export.json"], events  # the earlier export.json goes first
    assert [e for e in events if e[0] == "write"] == [], events  # no bundle file is written in place
    renames = [e for e in events if e[0] == "rename"]
    assert [e[2] for e in renames] == list(BUNDLE_FILES), events  # the model, labels, export.json last
    assert all(e[1].startswith(f".{e[2]}.") for e in renames), renames  # from a hidden name beside it
    assert sorted(f.name for f in folder.iterdir() if f.name.startswith(".model")) == []  # no temporary left

    meta = json.loads((folder / "export.json").read_text())
    p = meta["preprocessing"]
    assert meta["input"] == "N x 3 x 48 x 48" and (p["resize"], p["center_crop"]) == (54, 48)
    assert p["scaled_from"] == {"resize": 72, "center_crop": 64}
    assert "differs from the checkpoint's" in proc.stdout + proc.stderr
    images = tiny_run["images"][:4]
    recipe = recipe_probabilities(folder, images, tmp_path)
    loaded = load_trained(tiny_run["ckpt"])
    record = copy.deepcopy(loaded.hparams["preprocessing"])
    record["eval_transforms"][0]["size"], record["eval_transforms"][1]["size"] = 54, 48
    transform = transform_from_record(record)
    with torch.inference_mode():
        want = loaded.model(torch.stack([transform(load_rgb(f)) for f in images])).exp()
    got = torch.tensor([recipe[str(f)] for f in images])
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()


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
