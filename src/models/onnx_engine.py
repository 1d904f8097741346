"""A frozen backbone run by ONNX Runtime: the feature cache's engine for large embedding passes on a CPU.

Measured on a 2-core CPU (docs/benchmarks.md, "Embedding engines"): lite0's pooled features at 162-167
images/s through ONNX Runtime (fp32, exact to eager fp32) against 66-83 for eager bf16 + channels_last and 61
for torch.compile (two runs); the export and session cost 11-12.5 s once, repaid after 1,250-2,000 images.
The exported file is kept beside the features (named by the weights' digest and the input size), so later
runs skip the export.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from src.utils.io import atomic_write

log = logging.getLogger(__name__)


class OnnxBackbone:
    """``backbone`` exported to ONNX (fp32, any batch size, the example's image size) and run on the CPU."""

    def __init__(self, backbone: nn.Module, example: torch.Tensor, folder: Path, key: str) -> None:
        import onnxruntime

        height, width = example.shape[-2:]
        self.path = Path(folder) / f"{key[:32]}-{height}x{width}.onnx"
        if not self.path.is_file():
            export(backbone, example, self.path)
        self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {"images": x.numpy()})[0])


def export(backbone: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write the backbone's fp32 graph atomically (a copy is exported: the run's module is left as it is)."""
    net = copy.deepcopy(backbone).float().to(memory_format=torch.contiguous_format).eval()
    example = example[:1].detach().to("cpu", torch.float32).contiguous()
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per merged constant otherwise
    program = torch.onnx.export(
        net,
        (example,),
        input_names=["images"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
    )
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()), mode="wb")
    log.info("Exported the frozen backbone to %s for ONNX Runtime", path)
