"""The GPU check, for a machine with a GPU (issue 16): on a generated set of 3,900 JPEG photos (500×375),
the decode limit (the project's own loaders, no model), torchvision's nvjpeg decode on the GPU, lite0's bf16
forward rate, a lite0_fe run's embedding rates (3 epochs) and `make bench-predict` on the GPU. Writes
$OUT/results.json (and logs). SMALL=1: a 90-image dry run on the CPU.

    OUT=/tmp/out python -m benchmarks.gpu_check
"""

import json
import os
import re
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path("/tmp/syn")
OUT = Path(os.environ.get("OUT", "/tmp/gpu-check"))
RESULTS = {}


def say(key, value):
    RESULTS[key] = value
    print(f"RESULT {key} = {value}", flush=True)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=1))


def make_one(args):
    split, cls, i = args
    rng = np.random.default_rng(hash((split, cls, i)) % 2**32)
    w, h = (500, 375) if i % 3 else (375, 500)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.integers(0, w - 60), rng.integers(0, h - 60)
        s = int(rng.integers(30, 150))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.ellipse if cls == "c0" else d.rectangle if cls == "c1" else d.polygon)(
            [x, y, x + s, y + s] if cls != "c2" else [(x, y), (x + s, y), (x + s // 2, y + s)], fill=colour
        )
    folder = ROOT / split / cls
    im.save(folder / f"{cls}_{i:05d}.jpg", quality=90)


def make_set(train_per_class=1000, val_per_class=300):
    jobs = []
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in ("c0", "c1", "c2"):
            (ROOT / split / cls).mkdir(parents=True, exist_ok=True)
            jobs += [(split, cls, i) for i in range(n)]
    with Pool(16) as pool:
        pool.map(make_one, jobs, chunksize=32)
    return len(jobs)


def decode_limit():
    """The project's own loaders (train view and val transforms, default workers) without any model."""
    from src.train import instantiate_datamodule
    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(Path("/tmp/dl"), "experiment=lite0_fe", f"data.root={ROOT}")
    dm = instantiate_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    say("decode_workers", dm.num_workers)
    for split in ("val", "train"):
        n = 0
        loader = dm.image_loader(split, 32)
        start = time.perf_counter()
        for batch in loader:
            n += len(batch[0])
        say(f"decode_limit_{split}_img_s", round(n / (time.perf_counter() - start), 1))


def gpu_decode():
    """torchvision.io.decode_jpeg on the GPU (nvjpeg), batches of 64, + resize 256 / crop 224 / normalize."""
    import torch
    import torchvision.transforms.v2.functional as F
    from torchvision.io import decode_jpeg, read_file

    files = sorted((ROOT / "val").rglob("*.jpg"))
    datas = [read_file(str(f)) for f in files]
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(3, 1, 1)

    def run():
        for i in range(0, len(datas), 64):
            imgs = decode_jpeg(datas[i : i + 64], device="cuda")
            out = [F.center_crop(F.resize(im, 256, antialias=True), 224) for im in imgs]
            x = (torch.stack(out).float() / 255 - mean) / std
        torch.cuda.synchronize()
        return x

    run()
    start = time.perf_counter()
    run()
    say("gpu_decode_val_img_s_files_in_memory", round(len(datas) / (time.perf_counter() - start), 1))
    start = time.perf_counter()
    for f in files:
        read_file(str(f))
    say("read_file_img_s", round(len(files) / (time.perf_counter() - start), 1))


def backbone_rate():
    import torch

    from src.models.backbones import build_backbone

    net = build_backbone("efficientnet_lite0", "DEFAULT").module
    net = net.cuda().eval().to(memory_format=torch.channels_last)
    for bs in (32, 256):
        x = torch.randn(bs, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                net(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                net(x)
            torch.cuda.synchronize()
        say(f"backbone_bf16_bs{bs}_img_s", round(20 * bs / (time.perf_counter() - start), 1))


def fe_run():
    cmd = [sys.executable, "-m", "src.train", "experiment=lite0_fe", f"data.root={ROOT}", "trainer.max_epochs=3"]
    cmd += ["trainer.accelerator=cpu"] if os.environ.get("SMALL") == "1" else []
    cmd += ["hydra.run.dir=/tmp/fe", "paths.cache_dir=/tmp/fecache"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    say("fe_run_wall_s", round(time.perf_counter() - start, 1))
    (OUT / "fe.log").write_text(proc.stdout[-20000:] + proc.stderr[-40000:])
    if proc.returncode:
        say("fe_run_failed", proc.returncode)
        return None
    log = proc.stdout + proc.stderr
    for m in re.finditer(r"Embedded (\w+(?: view \d+)?): (\d+) of \d+ images in ([\d.]+) s \((\d+) img/s", log):
        say(f"embed_{m.group(1).replace(' ', '_')}_img_s", int(m.group(4)))
    summary = json.loads(Path("/tmp/fe/summary.json").read_text())
    say("fe_best_val_acc", summary["best_val_acc"])
    say("fe_wall_s_in_summary", summary.get("wall_s"))
    return summary["best_checkpoint"]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    small = os.environ.get("SMALL") == "1"  # a dry run here on the CPU
    say("images", make_set(20, 10) if small else make_set())
    say("make_set_s", round(time.perf_counter() - start, 1))
    for step in (decode_limit, gpu_decode, backbone_rate):
        try:
            step()
        except Exception as err:  # report and go on: one try only
            say(f"{step.__name__}_error", repr(err)[:500])
    ckpt = fe_run()
    if ckpt:
        cmd = [sys.executable, "-m", "benchmarks.predict_speed", "--data", str(ROOT), "--ckpt", ckpt]
        cmd += ["--device", "cpu" if small else "cuda", "--out", str(OUT / "predict.md")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        say("predict_rc", proc.returncode)
        (OUT / "predict.log").write_text(proc.stdout[-5000:] + proc.stderr[-20000:])


if __name__ == "__main__":
    main()
