"""Shipping a model: the Python API, the HTTP server and its page (in a real browser), the torch-free ONNX
bundle, the model card, the MLflow and CSV loggers."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests import forkrun
from tests.conftest import REPO, SMALL_IMAGES, compose_train_cfg, make_imagefolder

pytestmark = pytest.mark.slow


def test_the_python_api_predicts_paths_and_pil_images_alike(tiny_run):
    from src.inference import Classifier

    clf = Classifier.from_checkpoint(tiny_run["ckpt"], device="cpu")
    paths = [str(p) for p in tiny_run["images"]]
    from_paths = clf.predict(paths, top_k=2, batch_size=3)
    from_pil = clf.predict([Image.open(p) for p in paths], top_k=2)
    assert [r["class"] for r in from_paths] == [r["class"] for r in from_pil]
    for r in from_paths:
        assert r["class"] == r["top_k"][0]["class"] and r["class"] in ("ants", "bees")
        assert sum(t["probability"] for t in r["top_k"]) == pytest.approx(1.0, abs=1e-5)  # k = all classes
    assert len(clf.predict(paths[0])) == 1


def test_a_run_writes_a_model_card_and_logs_to_tensorboard_csv_and_mlflow_at_once(tiny_run):
    run = tiny_run["run"]
    card = (run / "MODEL_CARD.md").read_text()
    assert card.startswith("---\nlibrary_name: pytorch")
    assert "`ants`, `bees`" in card and "| ants | 6 | 4 | 3 |" in card and "Classifier.from_checkpoint" in card
    # logger=many: MLflow's own client reads the run back from the run folder's store ...
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and "val/acc" in runs[0].data.metrics and "train/loss" in runs[0].data.metrics
    # ... the CSV file holds the epoch's metrics and TensorBoard its event file
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert [float(r["val/acc"]) for r in rows if r["val/acc"]] == [pytest.approx(runs[0].data.metrics["val/acc"])]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def wandb_records(path: Path):
    """The protobuf records of a W&B offline run file (.wandb: a ':W&B' header, then a LevelDB-style log of
    32 KiB blocks, each record a 7-byte header (crc, length, kind: 1 whole, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def test_wandb_logs_offline_one_run_per_training_run(tmp_path, monkeypatch):
    """logger=wandb needs no network or account (offline); two runs in one process (a sweep) are two W&B runs."""
    pytest.importorskip("wandb", reason="logger=wandb needs the optional wandb package: pip install -e '.[trackers]'")
    from src.train import train

    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # not the user's ~/.config/wandb
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    data = make_imagefolder(tmp_path / "data", per_split={"train": 4, "val": 2})
    for job in ("a", "b"):
        overrides = [f"data.root={data}", *SMALL_IMAGES, "trainer.max_epochs=1", "logger=wandb"]
        train(compose_train_cfg(tmp_path / job, "experiment=lite0_fe", *overrides))
    for job in ("a", "b"):
        (run_file,) = (tmp_path / job / "wandb").glob("offline-run-*/run-*.wandb")
        history = [r.history for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
        logged = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
        assert {"val/acc", "val/loss", "train/loss"} <= logged, logged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, data: bytes, name: str) -> tuple[int, dict | bytes, float]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), time.perf_counter() - start


def form(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    """A multipart body of (field name, file name or None, content) parts."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_raw(port: int, body: bytes, boundary: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def huge_png(side: int) -> bytes:
    """A grey side×side PNG of a few hundred KB (written row by row: PIL would build the whole image first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(1), b"\x00" + b"\x80" * side  # each row: filter byte 0, then the pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tiny_run):
    port = free_port()
    log = tiny_run["tmp"] / "serve.log"
    proc = forkrun.start(
        "src.serve",
        f"ckpt_path={tiny_run['ckpt']}",
        f"port={port}",
        f"hydra.run.dir={tiny_run['tmp'] / 'serve'}",
        "body_timeout_s=3",  # the slow-body test waits this long
        cwd=REPO,
        log=log,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the server did not come up: {log.read_text()[-2000:]}")
    yield {"port": port, "proc": proc, "log": log}
    family = descendants(proc.pid)  # LitServe's worker and API processes: a killed parent would orphan them
    proc.kill()
    proc.wait()
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10  # killed processes take a moment to exit
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in family if alive(pid)], "LitServe processes left behind"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_server_answers_a_burst_like_the_api_and_refuses_bad_uploads(tiny_run, server):
    from src.inference import Classifier

    want = {
        p.name: r["class"]
        for p, r in zip(
            tiny_run["images"],
            Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict(tiny_run["images"]),
            strict=True,
        )
    }
    files = [p for p in tiny_run["images"] for _ in range(8)][:60]  # 60 requests, 8 at a time
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: (p.name, post(server["port"], p.read_bytes(), p.name)), files))
    wall = time.perf_counter() - start
    for name, (status, body, _) in answers:
        assert status == 200 and body["class"] == want[name], (name, status, body)
    latency = sorted(t for _, (_, _, t) in answers)
    print(
        f"60 requests, 8 concurrent: {60 / wall:.1f} requests/s, p50 {statistics.median(latency) * 1000:.0f} ms, "
        f"p95 {latency[int(0.95 * len(latency)) - 1] * 1000:.0f} ms"
    )
    status, body, _ = post(server["port"], b"this is not an image", "notes.txt")
    assert status == 400 and "not a decodable image" in body["detail"]
    status, body, _ = post(server["port"], os.urandom(11 * 1024 * 1024), "huge.jpg")  # max_upload_mb: 10
    assert status == 413
    thin = io.BytesIO()
    Image.new("RGB", (1, 30_000)).save(thin, "PNG")  # ~200 bytes; resized to 256 px wide: 9 GB
    status, body, _ = post(server["port"], thin.getvalue(), "thin.png")
    assert status == 400 and "longer than wide" in body["detail"], (status, body)
    for kind, data in (("application/json", b"{bad"), ("image/jpeg", b"\xff\xd8"), ("multipart/form-data", b"x")):
        request = urllib.request.Request(f"http://127.0.0.1:{server['port']}/predict", data, {"Content-Type": kind})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400 and "multipart form" in json.loads(refused.value.read())["detail"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/metadata", timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["classes"] == ["ants", "bees"] and meta["backbone"] == "efficientnet_lite0"
    assert "best_val_loss" in meta["training_metrics"]
    status, body, _ = post(server["port"], tiny_run["images"][0].read_bytes(), "again.png")  # still serving
    assert status == 200


def test_a_bad_upload_fails_only_its_own_request_and_huge_images_are_refused_unread(tiny_run, server):
    """16 requests at once (max_batch_size 8): an upload that is not an image, or is cut short, gets its own
    400 naming its own file only; the other requests of its batch are answered. A 13000×13000 PNG (169 MP, a few
    hundred KB) is refused from its header (max_image_mp), in well under the seconds its decoding takes."""
    good = [(f"good{i}.png", p.read_bytes()) for i, p in enumerate((tiny_run["images"] * 4)[:14])]
    whole = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(whole, "PNG")
    bad = [("notes.txt", b"this is not an image"), ("half.png", whole.getvalue()[: len(whole.getvalue()) // 2])]
    for _ in range(3):
        with cf.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda job: (job[0], post(server["port"], job[1], job[0])), good + bad))
        for name, (status, body, _) in answers:
            if name.startswith("good"):
                assert status == 200 and body["class"] in ("ants", "bees"), (name, status, body)
            else:
                assert status == 400 and body["detail"].startswith(name) and "good" not in body["detail"], body
    status, body, seconds = post(server["port"], huge_png(13_000), "huge.png")
    assert status == 413 and "13000×13000" in body["detail"] and "max_image_mp" in body["detail"], body
    assert seconds < 5, seconds
    assert post(server["port"], good[0][1], "after.png")[0] == 200


def test_the_pixel_budget_is_checked_from_the_header():
    """load_rgb(max_pixels): refused before decoding; a JPEG counts the pixels it is decoded at (draft mode)."""
    from src.data.images import ImageShapeError, ImageTooLargeError, load_rgb

    assert issubclass(ImageTooLargeError, ImageShapeError)  # callers that skip misshapen images skip these too
    data = huge_png(13_000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"13000×13000 px: 169\.0 megapixels, over the limit of 50 megapixels"):
        load_rgb(io.BytesIO(data), max_pixels=50_000_000)
    assert time.perf_counter() - start < 0.5
    jpeg = io.BytesIO()
    Image.new("RGB", (2000, 2000), "blue").save(jpeg, "JPEG")
    assert load_rgb(io.BytesIO(jpeg.getvalue()), min_side=512, max_pixels=1_000_000).size == (1000, 1000)  # 1/2
    with pytest.raises(ImageTooLargeError, match="2000×2000 px"):
        load_rgb(io.BytesIO(jpeg.getvalue()), max_pixels=1_000_000)  # no draft: 4 MP decoded
    assert load_rgb(io.BytesIO(jpeg.getvalue())).size == (2000, 2000)  # no budget: as before


def test_malformed_forms_and_slow_bodies_are_client_errors_without_a_traceback(tiny_run, server):
    """Multipart parser failures are 400s with a JSON detail; a body slower than body_timeout_s (3 s here) is a
    408 and its connection closed; a client that hangs up mid-body costs nothing. None of it logs a traceback."""
    port, image = server["port"], tiny_run["images"][0].read_bytes()
    logged = len(server["log"].read_text())
    b = uuid.uuid4().hex
    malformed = {
        "Too many fields": form([(f"x{i}", None, b"v") for i in range(5000)] + [("file", "a.png", image)], b),
        "Too many files": form([("file", "a.png", image), ("file2", "b.png", image)], b),
        '"name" must be provided': form([("", "a.png", image)], b).replace(b'; name=""', b""),
        "Part exceeded maximum size": form([("note", None, b"v" * 2_000_000), ("file", "a.png", image)], b),
        "Invalid multipart data": b"--another-boundary\r\n\r\nxx\r\n--another-boundary--\r\n",
    }
    for message, body in malformed.items():
        status, answer = post_raw(port, body, b)
        assert status == 400 and message in answer["detail"], (message, status, answer)
    # a slow body: the headers promise 100 kB, then one byte every 0.2 s
    head = form([("file", "slow.png", b"")], b).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    request = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={b}\r\n"
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(f"{request}Content-Length: 100000\r\n\r\n".encode() + head)
        slow.settimeout(0.2)
        start, answer = time.monotonic(), b""
        while not answer and time.monotonic() - start < 30:
            try:
                slow.sendall(b"x")
                answer = slow.recv(65536)
            except TimeoutError:
                pass
        waited = time.monotonic() - start
        slow.settimeout(5)  # then the server closes the connection (a reset counts: the bytes still coming)
        with contextlib.suppress(ConnectionResetError):
            while chunk := slow.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and 2.5 < waited < 15, (answer[:200], waited)
    assert "body_timeout_s" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    with socket.create_connection(("127.0.0.1", port)) as quitter:  # hangs up halfway through its body
        quitter.sendall(f"{request}Content-Length: 100000\r\n\r\n".encode() + head + b"x" * 100)
    time.sleep(0.5)
    assert post(port, image, "after.png")[0] == 200
    log = server["log"].read_text()[logged:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def test_the_server_shows_no_absolute_path_and_no_docs_unless_asked(tiny_run, server):
    """/metadata names the checkpoint by file name and SHA-256; FastAPI's /docs, /redoc, /openapi.json and
    LitServe's /info are off (docs=true turns the first three on)."""
    from omegaconf import OmegaConf

    from src.serve import build_server
    from src.utils.io import sha256_file

    with urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/metadata", timeout=10) as r:
        meta = json.loads(r.read())

    def strings(value):
        if isinstance(value, dict):
            yield from (s for v in value.values() for s in strings(v))
        elif isinstance(value, list):
            yield from (s for v in value for s in strings(v))
        elif isinstance(value, str):
            yield value

    assert not [s for s in strings(meta) if s.startswith("/") or str(REPO) in s or str(tiny_run["tmp"]) in s], meta
    assert meta["checkpoint"] == Path(tiny_run["ckpt"]).name
    assert meta["checkpoint_sha256"] == sha256_file(tiny_run["ckpt"])
    assert meta["limits"] == {"max_upload_mb": 10, "max_image_mp": 50}
    for path in ("/docs", "/redoc", "/openapi.json", "/info"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server['port']}{path}", timeout=10)
        assert missing.value.code == 404, path
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "serve.yaml"), {"ckpt_path": tiny_run["ckpt"], "docs": True})
    routes = {getattr(r, "path", None) for r in build_server(cfg).app.routes}
    assert {"/docs", "/redoc", "/openapi.json", "/predict", "/metadata"} <= routes and "/info" not in routes


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium; .ci/run does)")
def test_the_page_shows_the_class_of_a_chosen_image_in_a_real_browser(tiny_run, server):
    from playwright.sync_api import sync_playwright

    from src.inference import Classifier

    image = tiny_run["images"][-1]
    want = Classifier.from_checkpoint(tiny_run["ckpt"], "cpu").predict([image])[0]["class"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server['port']}/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#top[data-class]:not([data-class=''])", timeout=30_000)
            assert page.get_attribute("#top", "data-class") == want
            assert page.locator("#bars .bar").count() == 2
            assert page.is_visible("#preview")
        finally:
            browser.close()


def test_sigterm_stops_the_server_and_every_process_it_started(server):
    """``kill``, ``docker stop`` and Kubernetes send SIGTERM: the server shuts down (status 0) with LitServe's
    worker and API processes, in seconds. (The last test here: the module's server is gone after it.)"""
    proc = server["proc"]
    family = descendants(proc.pid)
    assert len(family) >= 2, family  # at least the inference worker and the API server
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in family if alive(pid)], "LitServe processes left behind"
    # no traceback through this project's code (LitServe may log its monitor thread losing the queue manager
    # it has just shut down: its own shutdown race, harmless)
    log = server["log"].read_text()
    assert f'File "{REPO / "src"}' not in log and "KeyboardInterrupt\n" not in log, log[-3000:]


def test_the_model_card_keeps_odd_class_names_as_text():
    """Class names are folder names: Markdown or HTML in them stays text, a `|` does not add a table column."""
    from src.inference.model_card import model_card

    evil = "<img src=x onerror=alert(1)>|dog*s*"
    card = model_card(
        {"class_names": ["cats", evil], "backbone": {"name": "efficientnet_lite0"}},
        {"train": {"cats": 6, evil: 6}, "val": {"cats": 3, evil: 3}},
        {},
        {"val": {"accuracy": 1.0, "macro_f1": 1.0, "per_class": {evil: {"f1": 1.0, "support": 3}}}},
        None,
    )
    outside_code = re.sub(r"`[^`]*`", "", card)  # a code span shows its text as typed
    assert "<img" not in outside_code.replace("\\<img", "")  # elsewhere only escaped
    rows = [line for line in card.splitlines() if "img" in line and line.startswith("|")]
    assert len(rows) == 2 and all(line.replace("\\|", "").count("|") in (4, 6) for line in rows), rows


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"host": "localhost"}, "LitServe listens on 127.0.0.1"),
        ({"port": 80}, "port must be a whole number in [1024, 65535]"),
        ({"log_level": "loud"}, "log_level='loud': choose one of"),
        ({"max_upload_mb": -1}, "max_upload_mb must be a positive number"),
        ({"accelerator": "tpu"}, "choose auto, cpu or cuda"),
        ({"max_image_mp": 0}, "max_image_mp must be a positive number"),
        ({"body_timeout_s": "soon"}, "body_timeout_s must be a positive number"),
        ({"docs": "yes"}, "docs must be true or false"),
    ],
)
def test_server_settings_are_checked_before_anything_starts(override, message):
    from omegaconf import OmegaConf

    from src.serve import check_settings
    from src.utils.errors import ConfigError

    settings = {"host": "127.0.0.1", "port": 8000, "log_level": "info", "max_upload_mb": 10}
    settings |= {"request_timeout_s": 30, "accelerator": "auto", "max_image_mp": 50, "body_timeout_s": 60}
    settings |= {"docs": False, **override}
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_settings(OmegaConf.create(settings))
