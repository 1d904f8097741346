"""Shared fixtures: tiny ImageFolders built in tmp_path, the shared real data set, CLI runner."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# under pytest-xdist (make test: -n 2) each worker is one process on one core: one torch thread each, or two
# workers' thread pools fight over the two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"


# 64-px crops instead of the recipe's 224: end-to-end tests of resuming, scaling and checkpoints that do not
# depend on the image size run ~10x less backbone work (the recipe's transforms are tested on their own)
SMALL_IMAGES = (
    "data.train_transforms=[{_target_: torchvision.transforms.RandomResizedCrop, size: 72, scale: [0.8, 1.0]},"
    "{_target_: torchvision.transforms.RandomHorizontalFlip},{_target_: torchvision.transforms.CenterCrop, size: 64}]",
    "data.eval_transforms=[{_target_: torchvision.transforms.Resize, size: 72},"
    "{_target_: torchvision.transforms.CenterCrop, size: 64}]",
)


def make_imagefolder(root: Path, classes=("ants", "bees"), per_split=None, size=(64, 48), seed: int = 0) -> Path:
    """Write a tiny ImageFolder: each class a distinct colour plus noise, PNG files."""
    per_split = per_split or {"train": 6, "val": 4}
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[k % 3] = 200
            for i in range(count):
                arr = np.clip(base + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{name}_{i}.png")
    return root


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the forkserver of tests/forkrun.py now: it imports the entry modules on the other core while
    the first in-process tests run (not in pytest-xdist's controller, which runs no test)."""
    from tests import forkrun

    if getattr(session.config, "workerinput", None) is None and session.config.getoption("numprocesses", None):
        return

    forkrun.warm_up()


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "tiny")


@pytest.fixture
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip(f"shared data set not present at {HYMENOPTERA}")
    return HYMENOPTERA


@pytest.fixture
def cfg_train(tmp_path: Path, tiny_data: Path):
    """The real training config (lite0_fe) on the tiny ImageFolder, shrunk for speed: 64-px crops, batches of 4,
    2 epochs; outputs in tmp_path/run. Tests add what they check with ``OmegaConf`` or compose their own."""
    return compose_train_cfg(
        tmp_path / "run",
        "experiment=lite0_fe",
        f"data.root={tiny_data}",
        *SMALL_IMAGES,
        "data.batch_size=4",
        "trainer.max_epochs=2",
    )


@pytest.fixture(scope="session")
def lite0_on_hymenoptera() -> dict:
    """The packaged efficientnet_lite0 (its ImageNet classifier kept aside) over hymenoptera's val images with
    the recipe's eval transforms, each image decoded once: fp32 and bf16 + channels_last pooled features,
    labels, class_to_idx and the classifier. Shared by the tests that need lite0 on real data."""
    import torch
    from torchvision import transforms as T

    from src.data.datamodule import ImageFolderDataModule
    from src.models.backbones import packaged_efficientnet_lite, weights_preprocessing

    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip(f"shared data set not present at {HYMENOPTERA}")
    model, _ = packaged_efficientnet_lite("efficientnet_lite0", "DEFAULT")
    classifier = model.classifier
    model.reset_classifier(0)  # pooled features out
    net = model.eval()
    recipe_eval = [T.Resize(256), T.CenterCrop(224)]
    weights = weights_preprocessing("efficientnet_lite0")
    dm = ImageFolderDataModule(  # JPEG draft decoding as the config's default (conf/data/imagefolder.yaml)
        HYMENOPTERA, recipe_eval, recipe_eval, weights.mean, weights.std, num_workers=2, decode_min_side=512
    )
    dm.setup("fit")
    out: dict = {"classifier": classifier.eval(), "class_to_idx": dm.datasets["val"].class_to_idx}
    fp32, bf16, labels = [], [], []
    with torch.inference_mode():
        for x, y in dm.image_loader("val", 32):
            fp32.append(net.to(memory_format=torch.contiguous_format)(x).float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fast = net.to(memory_format=torch.channels_last)
                bf16.append(fast(x.contiguous(memory_format=torch.channels_last)).float())
            labels.append(y)
    out["val"] = (torch.cat(fp32), torch.cat(labels))
    out["val_bf16"] = torch.cat(bf16)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """lite0 (packaged weights, so checkpoints are slim) trained in-process 1 epoch on a tiny folder with a test
    split and 64-px crops, logged to TensorBoard, CSV and MLflow (logger=many): the trained model that the
    eval, predict, export and shipping tests share. Tests that change the run copy it first."""
    import json

    from src.train import train

    tmp = tmp_path_factory.mktemp("tiny_run")
    data = make_imagefolder(tmp / "data", per_split={"train": 6, "val": 4, "test": 3}, size=(80, 60))
    run = tmp / "run"
    train(
        compose_train_cfg(
            run,
            "experiment=lite0_fe",
            f"data.root={data}",
            *SMALL_IMAGES,  # the checkpoint records them: eval, predict and export use what it says
            "trainer.max_epochs=1",
            "logger=many",
        )
    )
    summary = json.loads((run / "summary.json").read_text())
    images = sorted((data / "val").glob("*/*.png"))
    ckpt = summary["best_checkpoint"]
    return {"tmp": tmp, "data": data, "run": run, "summary": summary, "ckpt": ckpt, "images": images}


def run_cli(*args: str, scratch: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m src.train ARGS`` from the repository root in a process of its own, as a user would
    (forked from a server that imported it already: tests/forkrun.py).

    Caches go under ``scratch`` so tests never write into the repository.
    """
    from tests import forkrun

    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return forkrun.run("src.train", *args, f"paths.cache_dir={scratch / 'cache'}", cwd=REPO, env=env, timeout=timeout)


def compose_train_cfg(output_dir: Path, *overrides: str):
    """The real training config (Hydra compose API) for an in-process ``train(cfg)``: outputs in
    ``output_dir``, caches beside it, no Hydra run folder or logging set-up."""
    return compose_cfg("train", output_dir, *overrides)


def train_in(out: Path, *overrides: str) -> dict:
    """``train(cfg)`` in this process on the real config (``compose_train_cfg``); its summary."""
    from src.train import train

    return train(compose_train_cfg(out, *overrides))


def assert_same_history(a: list[dict], b: list[dict], keys=("train/loss", "val/loss", "val/acc")) -> None:
    """Two runs' per-epoch figures equal to 1e-6, epoch by epoch."""
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert abs(x[key] - y[key]) <= 1e-6, (x["epoch"], key, x[key], y[key])


def compose_cfg(config_name: str, output_dir: Path, *overrides: str):
    """A task's real config (train, eval, audit, ...) composed for an in-process call, as
    ``compose_train_cfg``; a Hydra main takes it directly: ``main(cfg)``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import src.train  # noqa: F401  (registers the config's resolvers)

    fixed = [
        f"paths.root_dir={REPO}",
        f"paths.output_dir={output_dir}",
        f"paths.cache_dir={output_dir.parent / 'cache'}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=[*fixed, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # what a Hydra main would have set (run mode, overrides)
    with open_dict(cfg):
        del cfg.hydra  # resolving it would create a run folder under logs/
    return cfg
