"""Export a checkpoint: ``python -m src.export ckpt_path=... format=onnx|torch_export|torchscript``.

Writes model.onnx, model.pt2 (torch.export) or model.pt (TorchScript) — input: a normalized N×3×S×S batch,
N dynamic; output: log-probabilities — with labels.txt and export.json: the classes in output order, every
step the Python API takes from file to input as plain values (JPEG draft decoding and its min side, EXIF
orientation, wide greyscale scaling, resize, center_crop, interpolation, mean, std, each step's rule), the
source checkpoint's SHA-256 and the check against PyTorch. With export.json, model.onnx runs with onnxruntime,
numpy and PIL only, as the README's code does. ``image_size=S`` other than the checkpoint's crop scales
resize and center_crop with it, so the preprocessing always makes the input the graph takes.

A bundle is never torn: an earlier export.json in the folder is removed first, then each file is written
under a hidden temporary name beside its own and renamed into place, export.json last. A folder without
export.json holds an export cut short; one with it holds a whole bundle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.images import WIDE_GREYSCALE
from src.data.preprocessing import PIL_FILTERS
from src.inference.checkpoint import load_trained
from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError, UserError
from src.utils.io import atomic_path, atomic_write, sha256_file, write_json

log = logging.getLogger("src.export")


class InferenceNet(torch.nn.Module):
    """Backbone and head as a plain module: what runtimes need, without Lightning's trainer plumbing."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


FORMATS = ("onnx", "torch_export", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torch_export": "model.pt2", "torchscript": "model.pt"}
FILTER_NAMES = {code: name for name, code in PIL_FILTERS.items()}
# what each step of export.json's preprocessing does, in order (``steps``); the values are beside them
DECODING_RULES = {
    "decode_min_side": "a JPEG whose short side is at least 2 * decode_min_side is decoded at a reduced scale: "
    "PIL's Image.draft('RGB', size) before loading, each side of size round(side * (decode_min_side / short "
    "side)), at least 1 (src.data.images.load_rgb); null: never",
    "exif_transpose": "then PIL's ImageOps.exif_transpose: the EXIF orientation applied",
    "wide_greyscale": "then an image in one of these modes becomes 8-bit greyscale, each value v as "
    "clip(floor(v / full * 255 + 0.5), 0, 255), full the first of the mode's values at or above the image's "
    "largest value, else the last (PIL's convert would clip, not scale)",
    "rgb": "then PIL's convert('RGB') (a palette image with transparency through convert('RGBA'): the same "
    "pixels, without PIL's warning)",
}
RESIZE_CROP_RULES = {
    "resize": "the short side to `resize`, the long side int(resize * long / short), PIL's resize with "
    "`interpolation` (torchvision's Resize)",
    "center_crop": "offsets round((side - center_crop) / 2) (Python's round; torchvision's CenterCrop)",
}
TRANSFORMS_RULE = "the checkpoint's torchvision eval transforms as recorded: a client must reproduce them"
NORMALIZE_RULE = "pixels / 255 as float32, minus `mean`, divided by `std`, per RGB channel; channels first"
SCALED_RULE = (
    "image_size differs from the checkpoint's crop (scaled_from): center_crop is image_size, resize the "
    "checkpoint's times image_size / its center_crop, rounded with Python's round"
)


def bundle_preprocessing(hparams: dict, image_size: int | None = None, decode_min_side: int | None = 512) -> dict:
    """Every step the Python API takes from an image file to the model's input, as plain values and in
    ``steps`` order: decode (JPEG draft mode down to ``decode_min_side``), EXIF orientation, wide greyscale
    scaled, RGB; then resize the short side to ``resize`` with ``interpolation``, centre-crop ``center_crop``,
    scale to [0, 1], subtract ``mean``, divide by ``std`` (channels first), with torchvision's rounding. Each
    step's rule is in ``rules``: a client without torch follows them to the API's input (the README's code).

    ``image_size`` other than the checkpoint's crop scales resize by the same ratio, recording the checkpoint's
    pair as ``scaled_from``: the preprocessing always makes the input the graph takes. Eval transforms other
    than that pair are recorded as they are (``eval_transforms``) without ``resize``/``center_crop``: a client
    reading those keys then fails instead of preprocessing differently; they can't be rescaled, so an
    ``image_size`` other than their size is refused."""
    record = hparams.get("preprocessing") or {}
    steps = record.get("eval_transforms") or []
    decoding = {
        "decode_min_side": decode_min_side,
        "exif_transpose": True,
        "wide_greyscale": {m: list(v) for m, v in WIDE_GREYSCALE.items()},
    }
    common = {
        "mean": list(record.get("mean") or []),
        "std": list(record.get("std") or []),
        "layout": "N x 3 x H x W, RGB, float32",
    }
    kinds = [str(s.get("transform", "")).rsplit(".", 1)[-1] for s in steps]
    sizes = [s.get("size") for s in steps]
    code = steps[0].get("interpolation", PIL_FILTERS["bilinear"]) if steps else None
    if kinds != ["Resize", "CenterCrop"] or any(side_of(size) is None for size in sizes) or code not in FILTER_NAMES:
        recorded = recorded_size(steps)
        if image_size is not None and recorded is not None and image_size != recorded:
            raise UserError(
                f"image_size={image_size} differs from the checkpoint's {recorded}, and its eval transforms are not "
                "a short-side Resize then a square CenterCrop that export.json could scale with it: export without "
                f"image_size. {steps}"
            )
        rules = {**DECODING_RULES, "eval_transforms": TRANSFORMS_RULE, "normalize": NORMALIZE_RULE}
        return {"steps": list(rules), **decoding, "eval_transforms": steps, **common, "rules": rules}
    resize, crop = side_of(sizes[0]), side_of(sizes[1])
    scaled = {}
    if image_size is not None and image_size != crop:
        scaled = {"scaled_from": {"resize": resize, "center_crop": crop}}
        resize, crop = round(resize * image_size / crop), image_size
    rules = {**DECODING_RULES, **RESIZE_CROP_RULES, "normalize": NORMALIZE_RULE}
    return {
        "steps": list(rules),
        **decoding,
        "resize": resize,
        "center_crop": crop,
        "interpolation": FILTER_NAMES[code],
        **scaled,
        **common,
        "rules": {**rules, **({"scaled_from": SCALED_RULE} if scaled else {})},
    }


def side_of(size: Any) -> int | None:
    """The one side length of a Resize/CenterCrop size (``256``, ``[256]``, or a square ``[224, 224]``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, list | tuple) and 1 <= len(size) <= 2 and len(set(size)) == 1 and isinstance(size[0], int):
        return size[0]
    return None


def recorded_size(steps: list[dict]) -> int | None:
    """The image size eval transforms make (their last CenterCrop, else their Resize); None without either."""
    for kind in ("CenterCrop", "Resize"):
        for step in reversed(steps):
            if str(step.get("transform", "")).endswith(kind):
                size = step.get("size")
                return int(size[0] if isinstance(size, list | tuple) else size)
    return None


def recorded_crop(hparams: dict) -> int:
    """The image size the checkpoint's eval transforms make (its last CenterCrop, else its Resize)."""
    size = recorded_size((hparams.get("preprocessing") or {}).get("eval_transforms") or [])
    if size is None:
        raise UserError("The checkpoint records no eval crop or resize: pass image_size=N.")
    return size


def dynamic_batch() -> dict[str, Any]:
    """The exported graphs take any batch size (up to 4096 images at once) for InferenceNet's input ``x``."""
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["log_probs"],
        dynamic_shapes=dynamic_batch(),
        opset_version=opset,
        dynamo=True,
        external_data=False,  # one self-contained file
    )


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def write_model(
    fmt: str, model: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, path: Path, opset: int
) -> torch.Tensor:
    """Write ``model`` in ``fmt`` to ``path`` (a temporary name: the caller renames it into place), load it back
    and return its outputs on ``check``."""
    if fmt == "onnx":
        export_onnx(model, example, path, opset)
        return run_onnx(path, check)
    if fmt == "torch_export":  # torch.export's ExportedProgram (.pt2): torch.export.load(path).module()
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())
        torch.export.save(program, str(path))
        with torch.inference_mode():
            return torch.export.load(str(path)).module()(check)
    with torch.no_grad():  # TorchScript is in maintenance mode upstream: kept for runtimes that only read it
        scripted = torch.jit.trace(model, example)
    scripted.save(str(path))
    with torch.inference_mode():
        return torch.jit.load(str(path))(check)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@report_user_errors
def main(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: choose one of {', '.join(FORMATS)}.")
    loaded = load_trained(cfg.ckpt_path, "cpu")
    classes, trained = loaded.classes, loaded.model
    model = InferenceNet(trained.backbone.to(memory_format=torch.contiguous_format), trained.head).eval()
    out_dir = Path(cfg.paths.output_dir)
    size = int(cfg.image_size) if cfg.get("image_size") is not None else recorded_crop(loaded.hparams)
    preprocessing = bundle_preprocessing(loaded.hparams, size, cfg.get("decode_min_side"))  # may refuse: first
    if "resize" not in preprocessing:
        log.warning(
            "export.json: the checkpoint's eval transforms are not a short-side Resize then a square CenterCrop, so "
            "they are recorded as they are (preprocessing.eval_transforms): a client without torch must reproduce "
            "them; the README's recipe does not apply. %s",
            preprocessing["eval_transforms"],
        )
    if "scaled_from" in preprocessing:
        was = preprocessing["scaled_from"]
        log.warning(
            "image_size=%d differs from the checkpoint's %d x %d crop: export.json's preprocessing is scaled with it "
            "(resize %d -> %d, center_crop %d -> %d), so this bundle's predictions differ from the checkpoint's own "
            "(src.predict, the Python API, its metrics).",
            size,
            was["center_crop"],
            was["center_crop"],
            was["resize"],
            preprocessing["resize"],
            was["center_crop"],
            preprocessing["center_crop"],
        )
    checkpoint_sha256 = sha256_file(Path(cfg.ckpt_path))
    torch.manual_seed(0)
    example, check = torch.randn(2, 3, size, size), torch.randn(5, 3, size, size)  # two batch sizes: N is dynamic
    with torch.inference_mode():
        expected = model(check)
    # from here on the folder has no export.json until the whole bundle is in place: never an old one beside a
    # new model; each file appears whole, by a rename
    (out_dir / "export.json").unlink(missing_ok=True)
    for name in (*MODEL_FILES.values(), "labels.txt", "export.json"):  # an earlier export killed mid-write
        for stale in out_dir.glob(f".{name}.*.tmp*"):
            stale.unlink(missing_ok=True)
    path = out_dir / MODEL_FILES[cfg.format]
    with atomic_path(path) as tmp:
        got = write_model(cfg.format, model, example, check, tmp, int(cfg.opset))
        diff = float((got - expected).abs().max())
        if not diff <= float(cfg.tolerance):  # before the rename: a model that fails its check is never published
            raise UserError(
                f"Exported {cfg.format} outputs differ from PyTorch's by {diff:.2e} > tolerance={cfg.tolerance}; "
                "nothing was written."
            )
    atomic_write(out_dir / "labels.txt", lambda f: f.write("\n".join(classes) + "\n"))
    write_json(
        out_dir / "export.json",
        {
            "format": cfg.format,
            "file": path.name,
            "input": f"N x 3 x {size} x {size}",
            "input_name": "images",
            "output": "log_probs",  # N x classes log-probabilities: exp() gives probabilities summing to 1
            "classes": classes,  # in output order
            "preprocessing": preprocessing,
            "source_checkpoint": str(cfg.ckpt_path),
            "source_checkpoint_sha256": checkpoint_sha256,
            "max_abs_diff_vs_pytorch": diff,
            "tolerance": float(cfg.tolerance),
        },
    )
    log.info(
        "Exported %s (max |diff| vs PyTorch %.2e on a batch of 5), labels.txt and export.json to %s",
        path.name,
        diff,
        out_dir,
    )


if __name__ == "__main__":
    main()
