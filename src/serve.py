"""Serve a checkpoint over HTTP: ``python -m src.serve ckpt_path=... [host=127.0.0.1] [port=8000]``.

LitServe (Lightning's serving engine: dynamic batching, worker processes) runs the model; the endpoints:
- ``POST /predict`` with a multipart form field ``file`` (one image) → ``{"class", "probability", "top_k"}``;
  not a decodable image → 400, larger than ``max_upload_mb`` → 413, with a JSON ``detail``; the server goes on;
- ``GET /health`` → 200 once the model is loaded (LitServe's);
- ``GET /metadata`` → classes, backbone, preprocessing, the training run's metrics;
- ``GET /`` → a small HTML page: choose or drop an image, see the top classes as bars.

Preprocessing and inference are the Python API's (src.inference.Classifier): what ``src.predict`` does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import litserve as ls
import torch
from fastapi import HTTPException
from omegaconf import DictConfig

from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError

log = logging.getLogger("src.serve")
PAGE = Path(__file__).parent / "inference" / "static" / "index.html"


class ClassifierAPI(ls.LitAPI):
    """One image per request, batched by LitServe; the model is loaded in each worker's ``setup``."""

    def __init__(self, ckpt_path: str, top_k: int, max_upload_bytes: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.ckpt_path, self.top_k, self.max_upload_bytes = ckpt_path, top_k, max_upload_bytes

    def setup(self, device: str) -> None:
        from src.inference.classifier import Classifier

        self.classifier = Classifier.from_checkpoint(self.ckpt_path, torch.device(device))

    def decode_request(self, request):  # noqa: ANN001  (LitServe reads an annotation as the request schema)
        from PIL import Image

        upload = request.get("file") if hasattr(request, "get") else None
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(400, "Send the image as a multipart form field named 'file'.")
        data = upload.file.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise HTTPException(413, f"The upload is larger than {self.max_upload_bytes} bytes (max_upload_mb).")
        try:
            return self.classifier.tensor(Image.open(io.BytesIO(data)))
        except Exception as err:  # not an image, truncated, a decompression bomb: the client's problem
            raise HTTPException(
                400, f"{upload.filename or 'the upload'} is not a decodable image ({type(err).__name__})."
            ) from None

    def predict(self, x: torch.Tensor) -> list[dict[str, Any]]:
        batch = x.unsqueeze(0) if x.ndim == 3 else x
        results = self.classifier.results(self.classifier.probabilities(batch), self.top_k)
        return results if x.ndim == 4 else results[0]

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def metadata(ckpt_path: str) -> dict[str, Any]:
    """Classes, backbone, preprocessing and the training run's best metrics (its summary.json, when the
    checkpoint still sits in its run folder)."""
    from src.inference.checkpoint import read_checkpoint

    hp = read_checkpoint(ckpt_path)["hyper_parameters"]
    summary_path = Path(ckpt_path).resolve().parent.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    keys = ("best_val_loss", "best_val_acc", "best_val_macro_f1", "best_val_balanced_acc", "best_epoch", "test")
    return {
        "classes": list(hp["class_names"]),
        "backbone": (hp.get("backbone") or {}).get("name"),
        "preprocessing": hp.get("preprocessing"),
        "checkpoint": str(ckpt_path),
        "training_metrics": {k: summary[k] for k in keys if k in summary},
    }


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer with its API and this project's page and metadata routes."""
    from fastapi.responses import HTMLResponse

    for key in ("max_batch_size", "top_k", "workers"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}.")
    info = metadata(cfg.ckpt_path)  # the checkpoint read and checked before any worker starts
    max_bytes = int(float(cfg.max_upload_mb) * 1024 * 1024)
    api = ClassifierAPI(
        str(cfg.ckpt_path), int(cfg.top_k), max_bytes, int(cfg.max_batch_size), float(cfg.batch_timeout)
    )
    server = ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.request_timeout_s),
        max_payload_size=max_bytes + 64 * 1024,  # the form's own bytes on top of the image
    )
    page = PAGE.read_text(encoding="utf-8")
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    server.app.add_api_route("/metadata", lambda: info, methods=["GET"])
    return server


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@report_user_errors
def main(cfg: DictConfig) -> None:
    server = build_server(cfg)
    log.info("Serving %s on http://%s:%s (POST /predict, GET /, /metadata, /health)", cfg.ckpt_path, cfg.host, cfg.port)
    signal.signal(signal.SIGTERM, stop_on_sigterm(os.getpid()))
    server.run(host=str(cfg.host), port=int(cfg.port), generate_client_file=False, log_level=str(cfg.log_level))


def stop_on_sigterm(server_pid: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler (``kill``, ``docker stop``, Kubernetes) that takes LitServe's Ctrl+C path in the
    server process: its shutdown on any other path first puts a stop marker into the workers' request queue
    through its queue manager, which is left waiting forever once the signal has interrupted the server's own
    call to that manager. The processes LitServe forks inherit the handler: there SIGTERM does what it always
    does, end the process (uvicorn re-raises it after its own graceful stop)."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != server_pid:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        raise KeyboardInterrupt

    return handler


if __name__ == "__main__":
    main()
