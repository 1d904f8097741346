"""`make bench-engines`: the frozen forward (lite0 pooled features) under each engine on this machine.

Eager fp32, eager bf16 autocast + channels_last (the project's default where the CPU has native bf16),
torch.compile (inductor) of that, and ONNX Runtime (fp32, CPU provider), over hymenoptera's val images
(the recipe's eval transforms, decoded once, batches of 32, 3 passes). Reports images/s after warm-up, the
one-off cost (compilation, export + session), the images a run must embed before that cost pays back, and
agreement with eager fp32 (ImageNet top-1 from lite0's own classifier, and the largest feature difference).
Writes the "## Embedding engines" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import transforms as T

from benchmarks.report import replace_section
from src.data.datamodule import ImageFolderDataModule
from src.models.backbones import packaged_efficientnet_lite, weights_preprocessing
from src.models.onnx_engine import OnnxBackbone

REPO = Path(__file__).resolve().parent.parent
BATCH = 32


def images(data: Path) -> torch.Tensor:
    weights = weights_preprocessing("efficientnet_lite0")
    recipe_eval = [T.Resize(256), T.CenterCrop(224)]
    dm = ImageFolderDataModule(data, recipe_eval, recipe_eval, weights.mean, weights.std, num_workers=1)
    dm.setup("fit")
    return torch.cat([x for x, _ in dm.image_loader("val", BATCH)])


def timed(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, passes: int
) -> tuple[float, float, torch.Tensor]:
    """(first batch's seconds, steady images/s over ``passes`` passes, features of one pass)."""
    with torch.inference_mode():
        start = time.perf_counter()
        forward(x[:BATCH])
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(passes):
            out = torch.cat([forward(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        rate = passes * len(x) / (time.perf_counter() - start)
    return first, rate, out.float().clone()  # a normal tensor (made in inference mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera_data"))
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args()
    x = images(Path(a.data).resolve())
    model, _ = packaged_efficientnet_lite("efficientnet_lite0", "DEFAULT")
    classifier = model.classifier
    model.reset_classifier(0)
    net = model.eval()
    fast = [None]

    def eager32(b: torch.Tensor) -> torch.Tensor:
        return net.to(memory_format=torch.contiguous_format)(b)

    def bf16(b: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (net if module is None else module)(b.contiguous(memory_format=torch.channels_last))

    results = {}
    _, rate, ref = timed(eager32, x, a.passes)
    results["eager fp32"] = (0.0, rate, ref)
    net.to(memory_format=torch.channels_last)
    first, rate, out = timed(bf16, x, a.passes)
    results["eager bf16 + channels_last (default)"] = (0.0, rate, out)
    fast[0] = torch.compile(net)
    first, rate, out = timed(lambda b: bf16(b, fast[0]), x, a.passes)
    results["torch.compile (inductor) bf16 + channels_last"] = (first, rate, out)

    import onnxruntime

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the feature cache's own engine, exported afresh
        engine = OnnxBackbone(net, x[:BATCH], Path(tmp), "bench")
    setup = time.perf_counter() - start
    first, rate, out = timed(engine, x, a.passes)
    results["ONNX Runtime fp32"] = (setup + first, rate, out)

    default_rate = results["eager bf16 + channels_last (default)"][1]
    classifier.eval().requires_grad_(False)
    top1 = classifier(ref).argmax(1)
    rows = []
    for name, (setup, rate, out) in results.items():
        agree = (classifier(out).argmax(1) == top1).float().mean().item()
        gain = 1 / default_rate - 1 / rate  # seconds saved per image against the default
        pays = f"{setup / gain:,.0f}" if setup and gain > 0 else ("—" if not setup else "never")
        diff = (out - ref).abs().max().item()
        rows.append(
            f"| {name} | {rate:.1f} | {rate / default_rate:.2f} | {setup:.1f} | {pays} | {agree:.4f} | {diff:.3f} |"
        )
    body = "\n".join(
        [
            f"`make bench-engines`: lite0 pooled features over hymenoptera val ({len(x)} images, batches of {BATCH}, "
            f"{a.passes} passes after one warm-up batch), torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, {platform.processor() or 'CPU'} ({os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads), {time.strftime('%Y-%m-%d')}. Pays back after: images a run "
            "must embed before the one-off cost is saved against the default. Top-1 agreement: lite0's ImageNet "
            "classifier on these features against eager fp32's.",
            "",
            "| engine | images/s | × default | one-off s | pays back (images) | top-1 agreement | max feature diff |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    replace_section(Path(a.out), "Embedding engines", body)


if __name__ == "__main__":
    main()
