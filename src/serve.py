"""Serve a checkpoint over HTTP: ``python -m src.serve ckpt_path=... [host=127.0.0.1] [port=8000]``.

LitServe (Lightning's serving engine: dynamic batching, worker processes) runs the model; the endpoints:
- ``POST /predict`` with a multipart form field ``file`` (one image) → ``{"class", "probability", "top_k"}``;
  not a decodable image or a malformed form → 400, a body slower than ``body_timeout_s`` → 408, larger than
  ``max_upload_mb`` or an image over ``max_image_mp`` megapixels → 413, each with a JSON ``detail`` and for
  that request alone (the others of its batch are answered); the server goes on;
- ``GET /health`` → 200 once the model is loaded (LitServe's);
- ``GET /metadata`` → classes, backbone, preprocessing, the checkpoint's file name and SHA-256, the limits,
  the training run's metrics;
- ``GET /`` → a small HTML page: choose or drop an image, see the top classes as bars.
FastAPI's ``/docs``, ``/redoc`` and ``/openapi.json`` only with ``docs=true``; LitServe's ``/info`` is removed.

Preprocessing and inference are the Python API's (src.inference.Classifier): what ``src.predict`` does.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import litserve as ls
import torch
from fastapi import Depends, HTTPException, Request, Response
from omegaconf import DictConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from src.utils.cli import report_user_errors
from src.utils.errors import ConfigError
from src.utils.lightning_compat import reading_request_handler
from src.utils.processes import die_with_parent

log = logging.getLogger("src.serve")
PAGE = Path(__file__).parent / "inference" / "static" / "index.html"
API_PATH = "/predict"
SEND_A_FORM = "Send the image as a multipart form field named 'file' (curl -F file=@photo.jpg ...)."
# One image per request; a few text fields beside it are tolerated (clients that add their own), thousands are
# work for the parser only (Starlette's default allows 1000 of each).
FORM_MAX_FILES, FORM_MAX_FIELDS = 1, 16
CLOSE = {"Connection": "close"}  # a client still sending a refused body gets no more of this connection


@dataclass(frozen=True)
class Refusal:
    """One request's own client error, carried through the batch in place of its image. LitServe answers a
    whole batch with an exception raised by any of its items (the others' clients would get this one's 400,
    naming its file), so decode_request returns this, predict skips it and encode_response answers it."""

    status: int
    detail: str


class ClassifierAPI(ls.LitAPI):
    """One image per request, batched by LitServe; the model is loaded in each worker's ``setup``."""

    def __init__(self, ckpt_path: str, top_k: int, max_pixels: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
        self.ckpt_path, self.top_k, self.max_pixels = ckpt_path, top_k, max_pixels

    def setup(self, device: str) -> None:
        from src.inference.classifier import Classifier

        die_with_parent()  # a kill -9 of the server must not leave this worker serving on its own
        self.classifier = Classifier.from_checkpoint(self.ckpt_path, torch.device(device), max_pixels=self.max_pixels)

    def decode_request(self, request):  # noqa: ANN001  (LitServe reads an annotation as the request schema)
        """``request``: read_upload's ``{"name", "data"}``; the image's tensor, or a Refusal naming its file."""
        from PIL import Image

        from src.data.images import ImageShapeError, ImageTooLargeError

        name = request["name"]
        try:  # decoded as src.predict decodes a file: EXIF orientation, wide greyscale, draft JPEG decoding
            return self.classifier.tensor(io.BytesIO(request["data"]))
        except ImageTooLargeError as err:  # from the header, before decoding
            return Refusal(413, f"{name}: {err} (max_image_mp).")
        except Image.DecompressionBombError as err:  # PIL's own limit, checked when it opens the file
            return Refusal(413, f"{name}: {err}")
        except ImageShapeError as err:
            return Refusal(400, f"{name}: {err}.")
        except Exception as err:  # not an image, truncated: the client's problem
            return Refusal(400, f"{name} is not a decodable image ({type(err).__name__}).")

    def batch(self, inputs: list) -> list:
        return list(inputs)  # tensors and Refusals: predict stacks the tensors

    def predict(self, x: Any) -> Any:
        """The results of the tensors among ``x`` (a batch's list, or one item when max_batch_size is 1), each
        Refusal left in its place."""
        items = x if isinstance(x, list) else [x]
        images = [item for item in items if isinstance(item, torch.Tensor)]
        results = iter(
            self.classifier.results(self.classifier.probabilities(torch.stack(images)), self.top_k) if images else []
        )
        out = [next(results) if isinstance(item, torch.Tensor) else item for item in items]
        return out if isinstance(x, list) else out[0]

    def encode_response(self, output: Any) -> Any:
        from fastapi.responses import JSONResponse

        if isinstance(output, Refusal):  # a response of its own: LitServe returns it as it is
            return JSONResponse({"detail": output.detail}, output.status)
        return output


async def read_upload(request: Any, max_upload_bytes: int, body_timeout_s: float) -> dict[str, Any]:
    """POST /predict's form, read before the request joins a batch: ``{"name": the file's name, "data": its
    bytes}`` for the worker; an HTTPException for the client. LitServe's own reading turns a malformed form (5000
    fields, a broken boundary) into a 500 with a traceback, and waits forever for a body that comes a byte at a
    time; each refusal here answers its own request alone."""
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect

    too_large = f"The upload is larger than {max_upload_bytes} bytes (max_upload_mb)."
    kind = request.headers.get("content-type", "").lower()
    if not (kind.startswith("multipart/form-data") and "boundary=" in kind):  # JSON, raw bytes, no boundary
        raise HTTPException(400, SEND_A_FORM)
    try:
        async with asyncio.timeout(body_timeout_s):
            form = await request.form(max_files=FORM_MAX_FILES, max_fields=FORM_MAX_FIELDS)
    except TimeoutError:
        raise HTTPException(
            408, f"The request body took longer than {body_timeout_s:g} s to arrive (body_timeout_s).", CLOSE
        ) from None
    except ClientDisconnect:  # nobody is left to read the answer; logged as a 400, without a traceback
        raise HTTPException(400, "The client closed the connection before its body was complete.") from None
    except StarletteHTTPException as err:  # Starlette's 400 for a malformed form, LitServe's 413 for a big body
        if err.status_code == 413:
            raise HTTPException(413, too_large, CLOSE) from None
        raise HTTPException(err.status_code, f"Malformed multipart form: {err.detail}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, SEND_A_FORM)
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, too_large)
        return {"name": upload.filename or "the upload", "data": data}
    finally:
        await form.close()


def metadata(ckpt_path: str, max_upload_mb: float, max_image_mp: float) -> dict[str, Any]:
    """Classes, backbone, preprocessing, the limits and the training run's best metrics (its summary.json, when
    the checkpoint still sits in its run folder). The checkpoint is named by its file name and SHA-256, never by
    its path: an answer must not show the server's directories, and the hash tells exactly which model answers
    (src.export records the same hash as ``source_checkpoint_sha256``)."""
    from src.inference.checkpoint import read_checkpoint
    from src.utils.io import sha256_file

    hp = read_checkpoint(ckpt_path)["hyper_parameters"]
    summary_path = Path(ckpt_path).resolve().parent.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    keys = ("best_val_loss", "best_val_acc", "best_val_macro_f1", "best_val_balanced_acc", "best_epoch", "test")
    return {
        "classes": list(hp["class_names"]),
        "backbone": (hp.get("backbone") or {}).get("name"),
        "preprocessing": hp.get("preprocessing"),
        "checkpoint": Path(ckpt_path).name,
        "checkpoint_sha256": sha256_file(ckpt_path),
        "limits": {"max_upload_mb": max_upload_mb, "max_image_mp": max_image_mp},
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
    for key in ("max_upload_mb", "max_image_mp", "request_timeout_s", "body_timeout_s"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}.")
    if not isinstance(cfg.get("docs"), bool):
        raise ConfigError(f"docs must be true or false, got {cfg.get('docs')!r}.")
    if str(cfg.accelerator) not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"accelerator={cfg.accelerator!r}: choose auto, cpu or cuda.")
    if str(cfg.accelerator) in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator={cfg.accelerator}, but torch sees no GPU here: use accelerator=auto or cpu.")


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer with its API, POST /predict read by read_upload, this project's page and metadata routes;
    FastAPI's docs only with ``docs=true``, LitServe's /info removed (/metadata says what a client needs)."""
    from fastapi.responses import HTMLResponse

    for key in ("max_batch_size", "top_k", "workers"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}.")
    check_settings(cfg)
    info = metadata(cfg.ckpt_path, cfg.max_upload_mb, cfg.max_image_mp)  # the checkpoint checked before any worker
    max_bytes = int(float(cfg.max_upload_mb) * 1024 * 1024)
    max_pixels = int(float(cfg.max_image_mp) * 1_000_000)
    api = ClassifierAPI(
        str(cfg.ckpt_path), int(cfg.top_k), max_pixels, int(cfg.max_batch_size), float(cfg.batch_timeout)
    )
    server = ls.LitServer(
        api,
        accelerator=str(cfg.accelerator),
        workers_per_device=int(cfg.workers),
        timeout=float(cfg.request_timeout_s),
        max_payload_size=max_bytes + 64 * 1024,  # the form's own bytes on top of the image
        disable_openapi_url=not cfg.docs,  # FastAPI adds /docs and /redoc only with /openapi.json
    )
    handler, authorize = reading_request_handler(
        api,
        server,
        functools.partial(read_upload, max_upload_bytes=max_bytes, body_timeout_s=float(cfg.body_timeout_s)),
    )

    async def predict(request: Request) -> Response:  # annotations resolved from this module's names
        return await handler.handle_request(request, Request)

    page = PAGE.read_text(encoding="utf-8")
    replaced = ("/", "/info", API_PATH)  # LitServe's index text, its settings page, its reading of the form
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) not in replaced]
    server.app.add_api_route(API_PATH, predict, methods=["POST"], dependencies=[Depends(authorize)])
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"], include_in_schema=False)
    server.app.add_api_route("/metadata", lambda: info, methods=["GET"])
    return server


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
