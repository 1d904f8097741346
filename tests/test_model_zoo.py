"""The model zoo: every torchvision family and timm models as feature extractors with layer groups and their
weights' own preprocessing; timm weights offline; the recipe options (label smoothing, augmentation presets,
MixUp/CutMix, EMA, the LR finder, test-time augmentation)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torchvision import transforms as T

from src.models import timm_backbones
from src.models.backbones import Preprocessing, build_backbone, weights_preprocessing
from src.models.layer_groups import ParameterSet, layer_groups
from src.utils.errors import ConfigError, WeightsUnavailableError
from tests.conftest import SMALL_IMAGES, compose_train_cfg, make_imagefolder

# one small member of each family whose structure differs (the acceptance check and docs/models.md cover the
# rest: every torchvision classification model was built and grouped once, see docs/models.md)
FAMILIES = [
    "squeezenet1_1",  # a 1x1 Conv2d classifier
    "mobilenet_v3_small",  # a Linear-Hardswish pre-logits layer kept before the classifier
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "densenet121",  # classifier is a bare Linear; features a Sequential of dense blocks
    "googlenet",  # auxiliary classifiers switched off
    "vit_b_16",  # a class token and position embedding outside any layer
    "timm/convnext_atto",
    "timm/vit_tiny_patch16_224",
    "efficientnet_lite2",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_extracts_pooled_features_in_layer_groups(name):
    built = build_backbone(name, None)
    pre = weights_preprocessing(name)
    with torch.no_grad():
        out = built.module.eval()(torch.zeros(2, 3, pre.crop, pre.crop))
    assert out.shape == (2, built.feature_dim)
    groups = layer_groups(name, built.module)
    names = [n for n, _ in groups]
    assert len(groups) >= 4 and len(set(names)) == len(names), names
    grouped = [id(p) for _, modules in groups for m in modules for p in m.parameters()]
    assert len(grouped) == len(set(grouped)), "a parameter in two groups"
    assert set(grouped) == {id(p) for p in built.module.parameters()}, "a parameter in no group"


def test_groups_keep_their_historic_names_and_vit_tokens_join_the_input_side():
    b0 = [n for n, _ in layer_groups("efficientnet_b0", build_backbone("efficientnet_b0", None).module)]
    assert b0 == [f"features.{i}" for i in range(9)]
    vit = build_backbone("vit_b_16", None).module
    groups = layer_groups("vit_b_16", vit)
    assert [n for n, _ in groups][:2] == ["conv_proj", "encoder.layers.encoder_layer_0"]
    assert [n for n, _ in groups][-1] == "encoder.ln"
    first = [p for m in groups[0][1] for p in m.parameters()]
    assert any(p is vit.class_token for p in first)  # a root parameter, held by a ParameterSet
    assert any(isinstance(m, ParameterSet) for m in groups[0][1])
    with pytest.raises(ConfigError, match="no parameters"):
        layer_groups("x", nn.ReLU())


def test_preprocessing_is_the_weights_own():
    for name in ("swin_t", "vit_b_16", "inception_v3"):
        tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        pre = weights_preprocessing(name)
        assert (pre.resize, pre.crop, pre.interpolation) == (tf.resize_size[0], tf.crop_size[0], tf.interpolation.value)
        assert (list(pre.mean), list(pre.std)) == (list(tf.mean), list(tf.std))
    assert weights_preprocessing("swin_t") == Preprocessing(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 232, 224, "bicubic"
    )
    # the packaged lite2 file is Google's TF release: timm's tf_efficientnet_lite2 config, 260 / 0.89 -> 292
    assert weights_preprocessing("efficientnet_lite2") == Preprocessing((0.5,) * 3, (0.5,) * 3, 292, 260, "bicubic")
    assert weights_preprocessing("timm/vit_tiny_patch16_224") == Preprocessing(
        (0.5,) * 3, (0.5,) * 3, 248, 224, "bicubic", fixed_input=True
    )


def test_a_run_takes_the_weights_preprocessing_unless_an_experiment_pins_the_seeds(tmp_path):
    from src.train import resolve_preprocessing

    cfg = compose_train_cfg(tmp_path / "a", "model.backbone.name=swin_t")
    resolve_preprocessing(cfg)
    assert (cfg.data.resize, cfg.data.crop, cfg.data.interpolation) == (232, 224, "bicubic")
    steps = OmegaConf.to_container(cfg.data.eval_transforms, resolve=True)
    assert steps[0] == {"_target_": "torchvision.transforms.Resize", "size": 232, "interpolation": 3}
    for experiment in ("resnet50_fe", "lite0_fe", "lite0_ft"):
        seed = compose_train_cfg(tmp_path / experiment, f"experiment={experiment}")
        resolve_preprocessing(seed)
        assert (seed.data.resize, seed.data.crop, seed.data.interpolation) == (256, 224, "bilinear")
    bad = {
        "data.interpolation=cubic": "data.interpolation must be one of",
        "data.resize=0": "data.resize must be a whole number",
        "data.crop=abc": "data.crop must be a whole number",
        "data.resize=64": "data.crop=224 is larger than data.resize=64",
        "model.backbone.name=vit_b_16 data.crop=64 data.resize=72": "vit_b_16 takes 224×224 images only",
        "~augment": "augment=seed",
    }
    for overrides, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            resolve_preprocessing(compose_train_cfg(tmp_path / "b", *overrides.split()))


def test_unknown_names_tags_and_weights_files_are_named_before_any_data_work(tmp_path):
    from src.models.backbones import fetch_weights

    with pytest.raises(ConfigError, match="timm/convnext_atto"):
        build_backbone("timm/convnext_ato", None)
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'.*timm/convnext_atto.d2_in1k"):
        build_backbone("timm/convnext_atto.nope", "DEFAULT")
    with pytest.raises(ConfigError, match="ends in a dot"):
        fetch_weights("timm/convnext_atto.", "DEFAULT")
    with pytest.raises(ConfigError, match="Did you mean: timm/convnext_atto"):
        fetch_weights("convnext_atto", None)
    with pytest.raises(ConfigError, match="Did you mean: resnet18"):
        fetch_weights("RESNET18", None)
    with pytest.raises(ConfigError, match="hub_timeout_s"):
        fetch_weights("timm/convnext_atto", "DEFAULT", hub_timeout_s=-1)
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsUnavailableError, match="is a directory"):
        fetch_weights("resnet18", str(tmp_path / "folder"))
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    for name in ("resnet18", "efficientnet_lite0", "timm/convnext_atto"):
        with pytest.raises(WeightsUnavailableError, match="not a readable weights file"):
            build_backbone(name, str(junk))


def fake_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache holding ``repo``'s model.safetensors (the layout huggingface_hub writes)."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_timm_default_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    reference = timm.create_model("convnext_atto.d2_in1k", pretrained=False)
    torch.nn.init.normal_(reference.stem[0].weight)  # not what random init gives
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = fake_hub_cache(tmp_path / "hub", "timm/convnext_atto.d2_in1k", reference.state_dict())
    built = build_backbone("timm/convnext_atto", "DEFAULT")
    assert torch.equal(built.module.stem[0].weight, reference.stem[0].weight)
    assert built.feature_dim == 320 and built.weights_sha256 == timm_backbones.sha256_file(path)
    local = build_backbone("timm/convnext_atto", str(path))  # a local file works the same
    assert torch.equal(local.module.stem[0].weight, reference.stem[0].weight)


def test_timm_weights_that_cannot_be_had_stop_at_once_with_the_ways_out(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm_backbones, "unreachable", lambda endpoint, timeout: "huggingface.co is offline")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("timm/convnext_atto", "DEFAULT")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "convnext_atto" in message and str(tmp_path / "hub" / "models--timm--convnext_atto.d2_in1k") in message
    assert "model.backbone.weights=/path/to/model.safetensors" in message and "lite2_fe" in message

    from src.train import train

    run = tmp_path / "run"  # the run stops before any data work: no preflight report
    with pytest.raises(WeightsUnavailableError):
        train(compose_train_cfg(run, "model.backbone.name=timm/convnext_atto", "data.root=/nonexistent"))
    assert not (run / "split.csv").exists()


# ----------------------------------------------------------------------------------------- recipe options


def test_label_smoothing_is_the_smoothed_nll_of_the_heads_log_probabilities():
    from tests.factories import tiny_model

    log_probs = torch.randn(5, 3).log_softmax(1)
    y = torch.tensor([0, 2, 1, 1, 0])
    plain = tiny_model(("a", "b", "c"))
    assert isinstance(plain.criterion, nn.NLLLoss)  # the seed's loss, untouched at 0
    smooth = tiny_model(("a", "b", "c"), loss={"label_smoothing": 0.1})
    nll = -log_probs[torch.arange(5), y]
    expected = (0.9 * nll + 0.1 * (-log_probs.mean(1))).mean()
    assert smooth.criterion(log_probs, y).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing"):
        tiny_model(loss={"label_smoothing": 1.0})


@pytest.mark.parametrize(
    "preset, policy",
    [
        ("trivialaugment", T.TrivialAugmentWide),
        ("randaugment", T.RandAugment),
        ("autoaugment", T.AutoAugment),
        ("seed", None),
    ],
)
def test_augmentation_presets_put_the_policy_inside_the_seeds_pipeline(tmp_path, preset, policy):
    from hydra.utils import instantiate
    from PIL import Image

    from src.train import resolve_preprocessing

    cfg = compose_train_cfg(tmp_path / "run", "experiment=lite0_fe", f"augment={preset}")
    resolve_preprocessing(cfg)
    steps = instantiate(cfg.data.train_transforms, _convert_="all")
    kinds = [type(s) for s in steps]
    seed = [T.RandomResizedCrop, T.RandomRotation, T.RandomHorizontalFlip]
    assert kinds == seed + ([policy] if policy else []) + [T.CenterCrop]
    out = T.Compose(steps)(Image.new("RGB", (300, 200), (120, 30, 200)))
    assert out.size == (224, 224)


def tiny_run_args(tmp_path: Path, experiment: str, epochs: int, train_per_class: int = 8) -> list[str]:
    """Overrides for a run of ``experiment`` on a tiny folder of 64-px crops in batches of 4."""
    data = make_imagefolder(tmp_path / "data", per_split={"train": train_per_class, "val": 4})
    return [
        f"experiment={experiment}",
        f"data.root={data}",
        *SMALL_IMAGES,
        "data.batch_size=4",
        f"trainer.max_epochs={epochs}",
    ]


@pytest.mark.slow
def test_mixup_and_cutmix_train_on_soft_targets_and_refuse_cached_features(tmp_path):
    from src.train import train

    base = tiny_run_args(tmp_path, "lite0_ft", epochs=1)
    mixed = ["model.mixup.alpha=0.4", "model.cutmix.alpha=1.0", "model.finetune.schedule=[{epoch: 0, groups: 1}]"]
    summary = train(compose_train_cfg(tmp_path / "ft", *base, *mixed))
    assert math.isfinite(summary["history"][0]["train/loss"])
    with pytest.raises(ConfigError, match="model.cache.enabled=false"):
        train(compose_train_cfg(tmp_path / "fe", *base, "model.mixup.alpha=0.4", "model.finetune.schedule=[]"))


def test_ema_warms_up_so_a_short_run_is_not_its_untrained_start():
    """A 16-step run whose weights move from 0 (untrained) to 1: with Lightning's fixed 0.999 the average ends at
    0.008, near the start (val accuracy 0.5 seen); the warm-up decay min(0.999, (1 + n) / (10 + n)) ends near the
    trained weights, and a long run averages with 0.999 again."""
    from torch.optim.swa_utils import AveragedModel

    from src.callbacks.ema import WarmupEMA, warmup_ema_update

    def average_after(steps: int, warmup: int) -> float:
        model = torch.nn.Linear(1, 1, bias=False)
        ema = AveragedModel(model, avg_fn=lambda a, c, n: warmup_ema_update(a, c, n, decay=0.999, warmup=warmup))
        with torch.no_grad():
            for k in range(steps):  # the first update copies the weights, as after Lightning's first step
                model.weight.fill_(k / (steps - 1))
                ema.update_parameters(model)
        return ema.module.weight.item()

    assert average_after(16, warmup=0) < 0.01
    assert average_after(16, warmup=10) > 0.6
    n = torch.tensor(20000.0)  # warmed up (past n = 8,991): the configured decay
    assert warmup_ema_update(torch.zeros(1), torch.ones(1), n, decay=0.999, warmup=10).item() == pytest.approx(
        1e-3, rel=1e-4
    )
    with pytest.raises(ConfigError, match="callbacks.ema.decay must be a number in"):
        WarmupEMA(decay=1.0)


@pytest.mark.slow
def test_ema_checkpoints_the_averaged_weights_and_keeps_the_raw_ones(tmp_path):
    from src.train import train

    base = tiny_run_args(tmp_path, "lite0_ft", epochs=2)
    ft = ["callbacks=ema", "callbacks.ema.decay=0.5", "model.finetune.schedule=[{epoch: 0, groups: 1}]"]
    summary = train(compose_train_cfg(tmp_path / "ema", *base, *ft))
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert not torch.equal(averaged["head.0.weight"], raw["head.0.weight"])  # the average lags the raw weights
    assert ckpt["averaging_state"]["n_averaged"].item() == 8  # 16 images in batches of 4, 2 epochs
    resumed = train(compose_train_cfg(tmp_path / "ema", *base, *ft, "trainer.max_epochs=3", "ckpt_path=last"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    ckpt = torch.load(resumed["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["averaging_state"]["n_averaged"].item() == 12
    assert not torch.equal(ckpt["state_dict"]["head.0.weight"], ckpt["current_model_state"]["head.0.weight"])
    with pytest.raises(ConfigError, match="model.slim_checkpoint=false"):
        train(compose_train_cfg(tmp_path / "fe", *base, "callbacks=ema", "model.finetune.schedule=[]"))


@pytest.mark.slow
def test_lr_find_trains_with_its_suggestion_as_if_it_were_configured(tmp_path):
    from src.train import train

    base = tiny_run_args(tmp_path, "lite0_fe", epochs=2, train_per_class=16)
    found = train(compose_train_cfg(tmp_path / "found", *base, "tune.lr_find=true", "tune.num_training=30"))
    lr = found["lr_find"]["suggestion"]
    assert 1e-6 <= lr <= 1.0 and found["lr_find"]["num_training"] == 30
    assert (tmp_path / "found" / "lr_find.png").stat().st_size > 1000
    assert not list((tmp_path / "found").glob(".lr_find_*.ckpt"))  # Lightning's temporary checkpoint is gone
    ckpt = torch.load(found["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == lr
    # the search leaves the initial weights and the random state as they were: the run is the run with that LR
    assert found["feature_cache"]["hits"] > 0  # the search embedded; the run read what it wrote
    plain = train(compose_train_cfg(tmp_path / "plain", *base, f"model.optimizer.lr={lr!r}"))
    for a, b in zip(found["history"], plain["history"], strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)
        assert a["val/loss"] == pytest.approx(b["val/loss"], abs=1e-6)


@pytest.mark.slow
def test_lr_find_crosses_fine_tuning_stages_on_cached_outputs(tmp_path):
    """The search's 20 steps span 5 epochs of 4 batches: into the stage that trains on cached block outputs."""
    from src.train import train

    base = tiny_run_args(tmp_path, "lite0_ft", epochs=2)
    stages = "model.finetune.schedule=[{epoch: 1, groups: 2}]"
    found = train(compose_train_cfg(tmp_path / "ft", *base, stages, "tune.lr_find=true", "tune.num_training=20"))
    assert found["lr_find"]["steps_run"] > 4 and found["lr_find"]["suggestion"] > 0
    assert [s["served_from"].split(" ")[0] for s in found["feature_cache"]["stages"]] == ["pooled", "outputs"]


def test_flip_tta_averages_the_probabilities_of_an_image_and_its_mirror():
    from src.inference.tta import check_tta, predict_log_probs

    class LeftHeavy(nn.Module):  # log-probabilities that depend on which half of the image is brighter
        def forward(self, x):
            left, right = x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x[..., x.shape[-1] // 2 :].mean((1, 2, 3))
            return torch.stack([left, right], 1).log_softmax(1)

    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 2.0
    model = LeftHeavy()
    plain = predict_log_probs(model, x).exp()
    flip = predict_log_probs(model, x, "flip").exp()
    assert plain[0, 0] > 0.8 and flip[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    x[..., :2] = 400.0  # log-probabilities near -400 on one side: the average stays finite (log space)
    assert torch.isfinite(predict_log_probs(model, x, "flip")).all()
    with pytest.raises(ConfigError, match="tta must be"):
        check_tta("flip5")
