"""Export a checkpoint: ``python -m src.export ckpt_path=... format=onnx|torch_export|torchscript``.

Writes model.onnx, model.pt2 (torch.export) or model.pt (TorchScript) — input: a normalized N×3×H×W batch,
N dynamic; output: log-probabilities — with labels.txt and export.json: the classes in output order, the
preprocessing a client applies (resize, center_crop, interpolation, mean, std), the source checkpoint's
SHA-256 and the check against PyTorch. With export.json, model.onnx runs with onnxruntime, numpy and PIL only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.preprocessing import PIL_FILTERS
from src.inference.checkpoint import load_trained
from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError, UserError
from src.utils.io import TEXT_OPTIONS, sha256_file, write_json

log = logging.getLogger("src.export")


class InferenceNet(torch.nn.Module):
    """Backbone and head as a plain module: what runtimes need, without Lightning's trainer plumbing."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


FORMATS = ("onnx", "torch_export", "torchscript")
FILTER_NAMES = {code: name for name, code in PIL_FILTERS.items()}


def bundle_preprocessing(hparams: dict) -> dict:
    """What a client without torch does to an RGB image before the model: resize the short side to ``resize``
    with ``interpolation``, centre-crop ``center_crop``, scale to [0, 1], subtract ``mean``, divide by ``std``
    (channels first), with torchvision's rounding (``rules``). Eval transforms other than that pair are
    recorded as they are (``eval_transforms``) without ``resize``/``center_crop``: a client reading those keys
    then fails instead of preprocessing differently."""
    record = hparams.get("preprocessing") or {}
    steps = record.get("eval_transforms") or []
    common = {
        "mean": list(record.get("mean") or []),
        "std": list(record.get("std") or []),
        "layout": "N x 3 x H x W, RGB, float32",
    }
    kinds = [str(s.get("transform", "")).rsplit(".", 1)[-1] for s in steps]
    sizes = [s.get("size") for s in steps]
    code = steps[0].get("interpolation", PIL_FILTERS["bilinear"]) if steps else None
    if kinds != ["Resize", "CenterCrop"] or any(side_of(size) is None for size in sizes) or code not in FILTER_NAMES:
        return {"eval_transforms": steps, **common}
    return {
        "resize": side_of(sizes[0]),
        "center_crop": side_of(sizes[1]),
        "interpolation": FILTER_NAMES[code],
        **common,
        "rules": "resize: the short side to `resize`, the long side int(resize * long / short); center_crop: "
        "offsets round((side - center_crop) / 2) (Python's round); the torchvision transforms' own rules",
    }


def side_of(size: Any) -> int | None:
    """The one side length of a Resize/CenterCrop size (``256``, ``[256]``, or a square ``[224, 224]``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, list | tuple) and 1 <= len(size) <= 2 and len(set(size)) == 1 and isinstance(size[0], int):
        return size[0]
    return None


def recorded_crop(hparams: dict) -> int:
    """The image size the checkpoint's eval transforms make (its last CenterCrop, else its Resize)."""
    steps = (hparams.get("preprocessing") or {}).get("eval_transforms") or []
    for kind in ("CenterCrop", "Resize"):
        for step in reversed(steps):
            if str(step.get("transform", "")).endswith(kind):
                size = step.get("size")
                return int(size[0] if isinstance(size, list | tuple) else size)
    raise UserError("The checkpoint records no eval crop or resize: pass image_size=N.")


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
    torch.manual_seed(0)
    example, check = torch.randn(2, 3, size, size), torch.randn(5, 3, size, size)  # two batch sizes: N is dynamic
    with torch.inference_mode():
        expected = model(check)
    if cfg.format == "onnx":
        path = out_dir / "model.onnx"
        export_onnx(model, example, path, int(cfg.opset))
        got = run_onnx(path, check)
    elif cfg.format == "torch_export":  # torch.export's ExportedProgram (.pt2): torch.export.load(path).module()
        path = out_dir / "model.pt2"
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())
        torch.export.save(program, str(path))
        with torch.inference_mode():
            got = torch.export.load(str(path)).module()(check)
    else:  # TorchScript is in maintenance mode upstream: kept for runtimes that only read it
        path = out_dir / "model.pt"
        with torch.no_grad():
            scripted = torch.jit.trace(model, example)
        scripted.save(str(path))
        with torch.inference_mode():
            got = torch.jit.load(str(path))(check)
    diff = float((got - expected).abs().max())
    preprocessing = bundle_preprocessing(loaded.hparams)
    if "resize" not in preprocessing:
        log.warning(
            "export.json: the checkpoint's eval transforms are not a short-side Resize then a square CenterCrop, so "
            "they are recorded as they are (preprocessing.eval_transforms): a client without torch must reproduce "
            "them; the README's recipe does not apply. %s",
            preprocessing["eval_transforms"],
        )
    (out_dir / "labels.txt").write_text("\n".join(classes) + "\n", **TEXT_OPTIONS)
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
            "source_checkpoint_sha256": sha256_file(Path(cfg.ckpt_path)),
            "max_abs_diff_vs_pytorch": diff,
            "tolerance": float(cfg.tolerance),
        },
    )
    if not diff <= float(cfg.tolerance):
        raise UserError(f"Exported {cfg.format} outputs differ from PyTorch's by {diff:.2e} > {cfg.tolerance}.")
    log.info("Exported %s (max |diff| vs PyTorch %.2e on a batch of 5) and labels.txt to %s", path.name, diff, out_dir)


if __name__ == "__main__":
    main()
