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
from src.utils.processes import die_with_parent

log = logging.getLogger("src.serve")
PAGE = Path(__file__).parent / "inference" / "static" / "index.html"
API_PATH = "/predict"


class ClassifierAPI(ls.LitAPI):
    """One image per request, batched by LitServe; the model is loaded in each worker's ``setup``."""

    def __init__(self, ckpt_path: str, top_k: int, max_upload_bytes: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.ckpt_path, self.top_k, self.max_upload_bytes = ckpt_path, top_k, max_upload_bytes

    def setup(self, device: str) -> None:
        from src.inference.classifier import Classifier

        die_with_parent()  # a kill -9 of the server must not leave this worker serving on its own
        self.classifier = Classifier.from_checkpoint(self.ckpt_path, torch.device(device))

    def decode_request(self, request):  # noqa: ANN001  (LitServe reads an annotation as the request schema)
        from src.data.images import ImageShapeError

        upload = request.get("file") if hasattr(request, "get") else None
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(400, "Send the image as a multipart form field named 'file'.")
        data = upload.file.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise HTTPException(413, f"The upload is larger than {self.max_upload_bytes} bytes (max_upload_mb).")
        try:  # decoded as src.predict decodes a file: EXIF orientation, wide greyscale, draft JPEG decoding
            return self.classifier.tensor(io.BytesIO(data))
        except ImageShapeError as err:
            raise HTTPException(400, f"{upload.filename or 'the upload'}: {err}.") from None
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


HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to: loopback, or every IPv4 / IPv6 interface
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def check_settings(cfg: DictConfig) -> None:
    """The server's settings, checked before the checkpoint is read or any process starts."""
    if str(cfg.host) not in HOSTS:
        raise ConfigError(
            f"host={cfg.host!r}: LitServe listens on 127.0.0.1 (this machine only), 0.0.0.0 (every IPv4 interface) "
            "or :: (every IPv6 interface); a proxy in front of it can serve a name or a single interface."
        )
    port = cfg.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise ConfigError(f"port must be a whole number in [1024, 65535] (LitServe's range), got {port!r}.")
    if str(cfg.log_level).lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level={cfg.log_level!r}: choose one of {', '.join(LOG_LEVELS)}.")
    for key in ("max_upload_mb", "request_timeout_s"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")
    if str(cfg.accelerator) not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"accelerator={cfg.accelerator!r}: choose auto, cpu or cuda.")
    if str(cfg.accelerator) in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator={cfg.accelerator}, but torch sees no GPU here: use accelerator=auto or cpu.")


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer with its API and this project's page and metadata routes."""
    from fastapi.responses import HTMLResponse

    for key in ("max_batch_size", "top_k", "workers"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}.")
    check_settings(cfg)
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
    server.app.middleware("http")(refuse_non_form_posts)
    page = PAGE.read_text(encoding="utf-8")
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    server.app.add_api_route("/metadata", lambda: info, methods=["GET"])
    return server


async def refuse_non_form_posts(request: Any, call_next: Callable) -> Any:
    """POST /predict takes a multipart form: anything else (no body, JSON, raw bytes, a form without its
    boundary) is the client's mistake, a 400 — LitServe would fail parsing it as JSON, a 500."""
    from fastapi.responses import JSONResponse

    kind = request.headers.get("content-type", "").lower()
    if (
        request.method == "POST"
        and request.url.path == API_PATH
        and not (kind.startswith("multipart/form-data") and "boundary=" in kind)
    ):
        return JSONResponse(
            {"detail": "Send the image as a multipart form field named 'file' (curl -F file=@photo.jpg ...)."}, 400
        )
    return await call_next(request)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@report_user_errors
def main(cfg: DictConfig) -> None:
    server = build_server(cfg)
    log.info("Serving %s on http://%s:%s (POST /predict, GET /, /metadata, /health)", cfg.ckpt_path, cfg.host, cfg.port)
    signal.signal(signal.SIGTERM, stop_on_sigterm(os.getpid()))
    # LitServe's forked processes (the API server, the queue manager) end with this one, even on kill -9 (its
    # spawned inference workers do the same in ClassifierAPI.setup): no orphan keeps the port
    os.register_at_fork(after_in_child=die_with_parent)
    server.run(host=str(cfg.host), port=int(cfg.port), generate_client_file=False, log_level=str(cfg.log_level).lower())


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
