"""The recipe's transforms come from conf/ exactly, and any image mode comes out 3×224×224."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torchvision import transforms as T

from src.data.datamodule import ImageFolderDataModule
from src.data.images import load_rgb
from tests.conftest import REPO


@pytest.fixture(scope="module")
def data_cfg():
    import src.train  # noqa: F401  (registers the config's resolvers)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=lite0_fe"]).data


def test_train_transforms_are_the_recipe(data_cfg):
    steps = instantiate(data_cfg.train_transforms, _convert_="all")
    assert [type(s) for s in steps] == [
        T.RandomResizedCrop,
        T.RandomRotation,
        T.RandomHorizontalFlip,
        T.CenterCrop,
    ]
    rrc, rot, flip, crop = steps
    assert rrc.size == (256, 256) and tuple(rrc.scale) == (0.8, 1.0)
    assert rot.degrees == [-15.0, 15.0]
    assert flip.p == 0.5
    assert crop.size == (224, 224)


def test_eval_transforms_are_the_recipe(data_cfg):
    steps = instantiate(data_cfg.eval_transforms, _convert_="all")
    assert [type(s) for s in steps] == [T.Resize, T.CenterCrop]
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    assert steps[0].interpolation == T.InterpolationMode.BILINEAR  # the seed's Resize(256)
    assert data_cfg.batch_size == 32


def test_datamodule_appends_totensor_and_the_backbones_normalization(tiny_data):
    from src.train import instantiate_datamodule
    from tests.conftest import compose_train_cfg

    cfg = compose_train_cfg(tiny_data.parent / "out", "experiment=lite0_fe", f"data.root={tiny_data}")
    dm = instantiate_datamodule(cfg)  # data.mean/std null: the weights' own (lite0's TF release: 0.5)
    last_two = dm.train_transform.transforms[-2:]
    assert isinstance(last_two[0], T.ToTensor) and isinstance(last_two[1], T.Normalize)
    assert last_two[1].mean == [0.5] * 3 and last_two[1].std == [0.5] * 3
    assert dm.eval_transform.transforms[-1].mean == [0.5] * 3


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda: Image.fromarray(np.full((300, 200), 90, np.uint8), "L")),
        ("RGBA", lambda: Image.new("RGBA", (320, 240), (10, 200, 30, 128))),
        ("P", lambda: Image.new("RGB", (300, 300), (200, 10, 10)).convert("P")),
        ("CMYK", lambda: Image.new("CMYK", (260, 300), (0, 255, 255, 0))),
    ],
)
def test_any_image_mode_becomes_3x224x224(tmp_path, data_cfg, mode, make):
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    make().save(path)
    img = load_rgb(path)
    assert img.mode == "RGB"
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for key in ("train_transforms", "eval_transforms"):
        tf = T.Compose([*instantiate(data_cfg[key], _convert_="all"), T.ToTensor(), T.Normalize(mean, std)])
        out = tf(img)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    px = np.asarray(load_rgb(path))[0, :, 0]
    assert px.tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_datamodule_batches_have_the_right_shape(tiny_data):
    dm = ImageFolderDataModule(
        tiny_data,
        [T.Resize(32), T.CenterCrop(32)],
        [T.Resize(32), T.CenterCrop(32)],
        mean=[0.5] * 3,
        std=[0.5] * 3,
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert dm.classes == ["ants", "bees"]
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 8


def test_draft_decoding_of_large_jpegs_changes_only_resampling_noise(tmp_path):
    yy, xx = np.mgrid[0:1000, 0:1300]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) // 10 % 256], -1).astype(np.uint8)
    big = tmp_path / "big.jpg"
    Image.fromarray(arr).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3)).save(big, quality=95)
    full, drafted = load_rgb(big), load_rgb(big, min_side=256)
    assert full.size == (1300, 1000)
    assert drafted.size == (650, 500)  # 1/2 scale: 1/4 would drop the short side below 256
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    diff = (tf(full) - tf(drafted)).abs()
    assert diff.mean() < 1 / 255 and diff.max() < 0.1
    small = tmp_path / "small.jpg"
    Image.fromarray(arr[:400, :500]).save(small)
    assert load_rgb(small, min_side=256).size == (500, 400)  # under 2x min_side: decoded in full
    png = tmp_path / "big.png"
    Image.fromarray(arr).save(png)
    assert load_rgb(png, min_side=256).size == (1300, 1000)  # draft mode exists for JPEG only
