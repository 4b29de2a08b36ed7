"""The sampling service over real HTTP: a Serve app on 127.0.0.1 in a local Ray cluster,
serving EMA weights the single-process trainer wrote (fetched over HTTP with credentials in
the URI), and a second app in the same Serve instance with a bearer token, a short request
timeout and the test-only fault hook (serve.fault_injection)."""
import base64
import functools
import http.client
import http.server
import io
import json
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import free_port, wait_for_http
from vdvae_dist.config import load

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from vdvae_dist.train.local import train_local

    out = tmp_path_factory.mktemp("run")
    cfg = load("tiny", overrides=["data.crops_per_image=20", "optim.total_steps=40", "train.checkpoint_every=0",
                                  "train.log_every=20", f"train.output={out}", "data.loader_workers=0", "engine.device=cpu"])
    summary = train_local(cfg, log=lambda *_: None)
    return out, summary


TOKEN = secrets.token_urlsafe(24)
TOKEN_ENV = "VDVAE_TEST_SERVE_TOKEN"
USER, PASSWORD = "alice", "s3cret-pw"


@pytest.fixture(scope="module")
def weights_url(trained):
    """The run folder over HTTP behind basic auth: the model URI carries user:password@."""
    out, _ = trained
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return None
            return super().send_head()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # clients that stop reading early
            pass

    server = Server(("127.0.0.1", free_port()), functools.partial(Handler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{USER}:{PASSWORD}@127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def service(trained, weights_url):
    import ray
    from ray import serve

    from vdvae_dist.serve.process import run

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", TOKEN_ENV: TOKEN}})
    cfg = load("tiny", overrides=["serve.host=127.0.0.1", f"serve.port={port}", "serve.max_n=16",
                                  "serve.max_batch_size=16", "serve.batch_wait_s=0.05", "serve.max_body_mb=1"])
    try:
        url = run(weights_url + "/ema_fp32.pt", cfg, blocking=False)
        wait_for_http(url + "/healthz", timeout_s=120)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def guarded(service, trained):
    """A second app under /guarded: bearer token from TOKEN_ENV, 3 s request timeout, health
    checks every second, batches of 4 (0.5 s to fill) and the test-only fault hook."""
    from ray import serve

    from vdvae_dist.serve.app import build

    out, _ = trained
    cfg = load("tiny", overrides=["serve.request_timeout_s=3", "serve.health_check_period_s=1",
                                  f"serve.auth_token_env={TOKEN_ENV}", "serve.fault_injection=true", "serve.max_n=4",
                                  "serve.max_batch_size=4", "serve.batch_wait_s=0.5"])
    serve.run(build(str(out), cfg), name="guarded", route_prefix="/guarded", blocking=False)
    url = service + "/guarded"
    wait_for_http(url + "/healthz", timeout_s=120, ok_only=True)
    yield url
    serve.delete("guarded")


def post(url, path, **kw):
    return requests.post(url + path, timeout=120, **kw)


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def test_health_and_info(service, trained):
    assert requests.get(service + "/healthz", timeout=30).json()["status"] == "ok"
    info = requests.get(service + "/info", timeout=30).json()
    _, summary = trained
    assert info["preset"] == "tiny" and info["step"] == 40 and info["weights"] == "EMA (fp32)"
    assert info["image_shape"] == [3, 32, 32] and info["latent_groups"] == 8 and info["max_n"] == 16
    assert info["parameters"] > 100_000 and info["precision"].startswith("fp32 (serving; the run trained with")
    assert info["training_metrics"]["test_bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"])
    assert info["source"].endswith("ema_fp32.pt")
    assert info["source"].startswith("http://127.0.0.1:")  # fetched with user:password@, shown without
    schema = requests.get(service + "/openapi.json", timeout=30).json()
    assert {"/sample", "/reconstruct", "/info", "/healthz"} <= set(schema["paths"])


def test_same_seed_same_images_and_png_grid(service):
    a = npy(post(service, "/sample", json={"n": 3, "seed": 11, "format": "npy"}))
    b = npy(post(service, "/sample", json={"n": 3, "seed": 11, "format": "npy"}))
    c = npy(post(service, "/sample", json={"n": 3, "seed": 12, "format": "npy"}))
    assert a.dtype == np.uint8 and a.shape == (3, 3, 32, 32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    r = post(service, "/sample", json={"n": 4, "seed": 11})
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "11"
    assert Image.open(io.BytesIO(r.content)).size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 grid, 2 px padding
    one = post(service, "/sample", json={"n": 1, "grid": False, "format": "npy"})  # no seed: one is drawn...
    again = post(service, "/sample", json={"n": 1, "seed": int(one.headers["x-seed"]), "format": "npy"})
    assert np.array_equal(npy(one), npy(again))  # ...and reported, so the result can be reproduced
    single = Image.open(io.BytesIO(post(service, "/sample", json={"n": 1, "grid": False}).content))
    assert single.size == (32, 32)


def test_temperature_per_group(service):
    zero = [0.0] * 8
    cold = npy(post(service, "/sample", json={"n": 4, "seed": 3, "format": "npy", "temperature": zero}))
    warm = npy(post(service, "/sample", json={"n": 4, "seed": 3, "format": "npy", "temperature": [0.0] * 7 + [1.0]}))
    scalar = npy(post(service, "/sample", json={"n": 4, "seed": 3, "format": "npy", "temperature": 0.0}))
    assert np.array_equal(cold, scalar)  # one value = that value for every group
    assert not np.array_equal(cold, warm)  # the last group's temperature alone changes the images


def test_concurrent_requests_are_batched_and_match_their_solo_results(service):
    solo = {s: npy(post(service, "/sample", json={"n": 2, "seed": s, "format": "npy"})) for s in (1, 2)}
    before = requests.get(service + "/info", timeout=30).json()["batching"]

    def call(i):
        return post(service, "/sample", json={"n": 2, "seed": 1 + i % 2, "format": "npy"})

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(call, range(64)))
    assert [r.status_code for r in responses] == [200] * 64
    after = requests.get(service + "/info", timeout=30).json()["batching"]
    assert after["forward_requests"] - before["forward_requests"] == 64
    assert after["batches"] - before["batches"] < 64 and after["largest_batch"] > 1  # shared forward passes
    for i, r in enumerate(responses):  # batching does not change a request's images (up to float rounding)
        diff = np.abs(npy(r).astype(int) - solo[1 + i % 2].astype(int))
        assert diff.mean() < 1.0


def _upload(image_HWC: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_HWC).save(buf, format="PNG")
    return buf.getvalue()


def test_reconstruct_full_depth_is_closer_than_depth_zero(service):
    from vdvae_dist.artifacts.images import resize_center_crop
    from vdvae_dist.data.readers import skimage_crops

    photo = skimage_crops(48, 1, seed=123)[0].transpose(1, 2, 0)  # 48 px: resized to 32 by the service
    data = _upload(photo)
    target = resize_center_crop(Image.fromarray(photo), 32).astype(float)
    errors = {}
    for depth in (0, 8):
        errs = []
        for seed in range(3):
            r = post(service, "/reconstruct", files={"image": ("x.png", data, "image/png")},
                     data={"depth": str(depth), "seed": str(seed)})
            assert r.status_code == 200, r.text
            assert float(r.headers["x-bits-per-dim"]) > 0 and r.headers["x-depth"] == str(depth)
            recon = np.asarray(Image.open(io.BytesIO(r.content)), dtype=float)
            errs.append(np.abs(recon - target).mean())
        errors[depth] = float(np.mean(errs))
    assert errors[8] < errors[0]
    # the same upload as base64 JSON gives the same result and bits/dim
    a = post(service, "/reconstruct", files={"image": ("x.png", data, "image/png")}, data={"depth": "4", "seed": "5"})
    b = post(service, "/reconstruct", json={"image_base64": base64.b64encode(data).decode(), "depth": 4, "seed": 5})
    assert a.content == b.content and a.headers["x-bits-per-dim"] == b.headers["x-bits-per-dim"]


@pytest.mark.parametrize("path, kw, status, field, allowed", [
    ("/sample", {"json": {"n": 0}}, 422, "n", "1..16"),
    ("/sample", {"json": {"n": 17}}, 422, "n", "1..16"),
    ("/sample", {"json": {"n": "many"}}, 422, "n", "1..serve.max_n"),
    ("/sample", {"json": {"temperature": [1.0, 1.0]}}, 422, "temperature", "exactly 8"),
    ("/sample", {"json": {"temperature": -1}}, 422, "temperature", ">= 0"),
    ("/sample", {"json": {"format": "gif"}}, 422, "format", "png"),
    ("/sample", {"json": {"n": 2, "color": "red"}}, 422, "color", "n, temperature, seed, format, grid"),
    ("/sample", {"json": {"seed": -5}}, 422, "seed", "0.."),
    ("/sample", {"json": {"n": 3, "grid": False}}, 422, "grid", "n = 1"),
    ("/sample", {"data": "x" * (2 * 2**20), "headers": {"content-type": "application/json"}}, 413, "body", "bytes"),
    ("/reconstruct", {"files": {"image": ("x.txt", b"not an image", "text/plain")}, "data": {"depth": "1"}},
     400, "image", "PNG"),
    ("/reconstruct", {"json": {"image_base64": "%%%", "depth": 1}}, 400, "image_base64", "base64"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "99"}}, 422, "depth", "0..8"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "1", "zoom": "2"}},
     422, "zoom", "image, depth"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}}, 422, "depth", "0..8"),
    ("/reconstruct", {"data": "depth=1", "headers": {"content-type": "text/plain"}}, 415, "content-type", "multipart"),
    ("/reconstruct", {"json": {"image_base64": "", "depth": 1, "extra": 1}}, 422, "extra", "image_base64"),
    # numbers: bounded, booleans are not numbers, huge digit strings are a 4xx (issue 11)
    ("/sample", {"json": {"temperature": 1e308}}, 422, "temperature", "<= 10"),
    ("/sample", {"json": {"temperature": 10.5}}, 422, "temperature", "<= 10"),
    ("/sample", {"json": {"temperature": [1.0] * 7 + [11]}}, 422, "temperature", "<= 10"),
    ("/sample", {"json": {"n": True}}, 422, "n", "1..serve.max_n"),
    ("/sample", {"json": {"seed": True}}, 422, "seed", "0.."),
    ("/sample", {"json": {"temperature": True}}, 422, "temperature", "[0, 10]"),
    ("/sample", {"json": {"grid": 1}}, 422, "grid", "png only"),
    ("/sample", {"data": '{"n": ' + "9" * 5000 + "}", "headers": {"content-type": "application/json"}},
     400, "body", "JSON"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "9" * 5000}},
     422, "depth", "integer"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "true"}},
     422, "depth", "integer"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "1", "seed": "true"}},
     422, "seed", "integer"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"depth": "1", "temperature": "1e308"}},
     422, "temperature", "<= 10"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")},
                      "data": {"depth": "1", "temperature": "1" + "0" * 400}}, 422, "temperature", "[0, 10]"),
    ("/reconstruct", {"files": {"image": ("x.png", b"", "image/png")},
                      "data": {"depth": "1", "temperature": "[true, 1, 1, 1, 1, 1, 1, 1]"}},
     422, "temperature", "number"),
    ("/reconstruct", {"json": {"image_base64": "", "depth": True}}, 422, "depth", "0..groups"),
    ("/reconstruct", {"json": {"image_base64": "", "depth": 1, "temperature": 11}}, 422, "temperature", "<= 10"),
    # a JSON body's values are bounded before anything parses it (issue 23 N3): 5,000 commas
    ("/sample", {"data": '{"n": 1, "temperature": [' + "1," * 5000 + "1]}",
                 "headers": {"content-type": "application/json"}}, 413, "body", "at most 4,096 values"),
    ("/sample", {"data": '{"n": 1, "temperature": [' + "1," * 5000 + "1]}"}, 413, "body", "at most 4,096 values"),
    ("/reconstruct", {"json": {"image_base64": "", "depth": 1, "temperature": [1] * 5000}}, 413, "body",
     "at most 4,096 values"),
])
def test_bad_input_gets_a_json_4xx_naming_the_field(service, path, kw, status, field, allowed):
    r = post(service, path, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and allowed in body["allowed"], body
    assert requests.get(service + "/healthz", timeout=30).status_code == 200  # the replica survived


# --- issue 11: body limit while streaming, image bombs and formats, decoding off the loop ----------

def chunked_post_unfinished(url: str, path: str, content_type: str, chunks) -> tuple[int, dict]:
    """POST a chunked body (no Content-Length) over a raw socket, but never end it: send the
    chunks, then wait for the answer. A server that reads the whole body before it checks
    the size never answers (the socket timeout bounds that hang)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for chunk in chunks:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = http.client.HTTPResponse(sock)  # no terminating 0-size chunk was sent
        response.begin()
        return response.status, json.loads(response.read())


def _body(head: bytes, fill: bytes, total: int = 2 * 2**20):
    """head, then `fill` repeated in 64 KiB chunks up to `total` bytes (2x the 1 MiB limit)."""
    yield head
    chunk = fill * (2**16 // len(fill))
    for _ in range(total // len(chunk)):
        yield chunk


BOUNDARY = "vdvae-test-boundary"
_MULTIPART_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="depth"\r\n\r\n1\r\n'
                   f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                   "Content-Type: image/png\r\n\r\n").encode()


@pytest.mark.parametrize("path, content_type, parts", [
    ("/sample", "application/json", (b'{"n": 1, "temperature": [', b"1.0  ")),
    ("/reconstruct", "application/json", (b'{"depth": 1, "image_base64": "', b"AAAA")),
    ("/reconstruct", f"multipart/form-data; boundary={BOUNDARY}", (_MULTIPART_HEAD, b"\0")),
], ids=["sample-json", "reconstruct-json", "reconstruct-multipart"])
def test_a_chunked_body_is_cut_off_at_the_limit_while_it_streams(service, path, content_type, parts):
    """No Content-Length, and a body that never ends: the 413 comes once more than 1 MiB
    (serve.max_body_mb) has arrived; nothing waits for (or buffers, or spools) the rest."""
    status, body = chunked_post_unfinished(service, path, content_type, _body(*parts))
    assert status == 413 and body["field"] == "body" and "1,048,576 bytes" in body["allowed"], body
    assert requests.get(service + "/healthz", timeout=30).status_code == 200


def _image(size, fmt, mode="RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=(120, 30, 200) if mode == "RGB" else 120).save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("name, data, status, allowed", [
    ("tiff", _image((40, 40), "TIFF"), 400, "PNG, JPEG, WebP or BMP"),
    ("gif", _image((40, 40), "GIF"), 400, "PNG, JPEG, WebP or BMP"),
    ("eps", _image((40, 40), "EPS"), 400, "PNG, JPEG, WebP or BMP"),
    ("1x20000 png", _image((1, 20_000), "PNG", "L"), 422, "times the shorter"),
    ("20000000x1 png", _image((20_000_000, 1), "PNG", "L"), 422, "times the shorter"),
    ("2048x2048 webp of one colour", _image((2048, 2048), "WEBP", lossless=True), 422,
     "the upload decode budget of this 32x32 model"),
])
def test_uploads_of_other_formats_or_thin_shapes_are_refused(service, name, data, status, allowed):
    r = post(service, "/reconstruct", files={"image": ("x", data, "application/octet-stream")}, data={"depth": "1"})
    assert r.status_code == status, r.text
    assert r.json()["field"] == "image" and allowed in r.json()["allowed"]


def test_info_does_not_show_credentials(service):
    text = requests.get(service + "/info", timeout=30).text
    assert PASSWORD not in text and USER not in text


def test_a_running_serve_with_other_http_options_is_refused(service, trained):
    from vdvae_dist.serve.process import run

    out, _ = trained
    port = free_port()
    with pytest.raises(ValueError) as e:  # Serve would keep its address and ignore the one asked for
        run(str(out), load("tiny", overrides=["serve.host=127.0.0.1", f"serve.port={port}"]), blocking=False)
    running = urlsplit(service).netloc
    assert f"127.0.0.1:{port}" in str(e.value) and running in str(e.value)
    assert requests.get(service + "/healthz", timeout=30).status_code == 200  # the running app is untouched


# --- the guarded app: token, timeout, health, batch isolation ------------------------------------

def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_every_route_but_healthz_needs_the_token(guarded):
    assert requests.get(guarded + "/healthz", timeout=30).status_code == 200
    for method, path in (("GET", "/info"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/sample"),
                         ("POST", "/reconstruct"), ("GET", "/nothing-here")):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
            r = requests.request(method, guarded + path, json={"n": 1}, headers=headers, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["field"] == "authorization" and TOKEN_ENV in r.json()["allowed"]
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert requests.get(guarded + "/info", headers=auth(), timeout=30).json()["max_n"] == 4
    assert requests.get(guarded + "/docs", headers=auth(), timeout=30).status_code == 200
    r = requests.post(guarded + "/sample", json={"n": 1, "seed": 1}, headers=auth(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def _batching(url) -> dict:
    return requests.get(url + "/info", headers=auth(), timeout=30).json()["batching"]


def test_a_failing_request_fails_alone_in_its_batch(guarded):
    """Test-only hook: X-VDVAE-Fault: raise makes the forward pass holding that request fail.
    Four concurrent requests fill one batch of four (serve.max_batch_size=4)."""
    def call(i):
        headers = {**auth(), **({"X-VDVAE-Fault": "raise"} if i == 0 else {})}
        return requests.post(guarded + "/sample", json={"n": 1, "seed": i, "format": "npy"}, headers=headers,
                             timeout=60)

    solo = {i: npy(call(i)) for i in (1, 2, 3)}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(call, range(4)))
    assert _batching(guarded)["largest_batch"] == 4  # the four shared one batch
    bad = responses[0].json()
    assert responses[0].status_code == 500 and bad["field"] == "request", bad
    # the client gets a request id, the replica's log the exception (it may show paths or data)
    assert "injected fault" not in responses[0].text and bad["request_id"] in bad["error"]
    assert replica_log_mentions(bad["request_id"], "injected fault")
    for i in (1, 2, 3):
        assert np.abs(npy(responses[i]).astype(int) - solo[i].astype(int)).mean() < 1.0


def replica_log_mentions(*texts: str, timeout_s: float = 30) -> bool:
    """Whether a Serve replica log of this machine's Ray sessions holds a line with all of
    texts (polled: the log is written by the replica's process)."""
    import glob
    import os
    import time

    root = os.environ.get("RAY_TMPDIR", "/tmp/ray")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in glob.glob(f"{root}/session_*/logs/serve/replica_guarded_*.log"):
            with open(path, errors="replace") as f:
                log = f.read()
            if texts[0] in log and all(t in log[log.index(texts[0]):] for t in texts[1:]):
                return True
        time.sleep(0.5)
    return False


def test_uploads_decode_off_the_event_loop(guarded):
    """Four uploads whose decoding takes two seconds each (the test-only "slow" fault):
    while two decode (DECODE_THREADS) and two wait, /info and /healthz answer within their
    3 s timeouts, and /info shows the decoding under way. Decoding on the loop would hold it
    for eight seconds, and /info could never see a decode running."""
    import time

    data = _image((48, 48), "PNG")

    def upload(_):
        return requests.post(guarded + "/reconstruct", files={"image": ("x.png", data, "image/png")},
                             data={"depth": "0", "seed": "1"}, headers={**auth(), "X-VDVAE-Fault": "slow"}, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        uploads = [pool.submit(upload, i) for i in range(4)]
        deadline = time.monotonic() + 60  # bounds the wait for the uploads to arrive
        while True:  # until the replica is decoding two of them
            load = requests.get(guarded + "/info", headers=auth(), timeout=3).json()["load"]
            if load["decode"]["running"] == 2 or time.monotonic() > deadline:
                break
        assert load["decode"]["running"] == 2, load
        assert requests.get(guarded + "/healthz", timeout=3).status_code == 200
        assert [f.result().status_code for f in uploads] == [200] * 4


def test_a_long_legitimate_batch_keeps_the_replica_healthy(guarded):
    """Issue 23 N1: four requests of n=4 whose forward passes each take two seconds longer
    (the "slow" fault) share one batch of four passes: past serve.request_timeout_s=3 in
    all, but each pass finishes within it. The requests time out (504) during the second
    pass, which runs on to about 4 s; /healthz stays 200 throughout and Serve keeps the
    replica (a batch timed as one would be "stuck" from 3 s until that pass ends, and
    Serve's health check, every second, would replace the replica)."""
    import time

    replica = requests.get(guarded + "/info", headers=auth(), timeout=30).json()["replica"]

    def call(i):
        return requests.post(guarded + "/sample", json={"n": 4, "seed": i, "format": "npy"},
                             headers={**auth(), "X-VDVAE-Fault": "slow"}, timeout=60)

    health = []
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(call, i) for i in range(4)]
        while not all(c.done() for c in calls):
            health.append(requests.get(guarded + "/healthz", timeout=30).status_code)
            time.sleep(0.1)
        statuses = [c.result().status_code for c in calls]
    while requests.get(guarded + "/info", headers=auth(), timeout=30).json()["load"]["model"]["running"]:
        health.append(requests.get(guarded + "/healthz", timeout=30).status_code)  # until the batch ends
        time.sleep(0.1)
    assert set(statuses) <= {200, 504} and 504 in statuses, statuses  # the batch ran past the timeout...
    assert set(health) == {200}, health  # ...and the replica stayed healthy
    assert _batching(guarded)["largest_batch"] == 4
    assert requests.get(guarded + "/info", headers=auth(), timeout=30).json()["replica"] == replica


def test_info_shows_no_local_path(guarded, trained):
    out, _ = trained
    info = requests.get(guarded + "/info", headers=auth(), timeout=30).json()
    assert str(out.parent) not in json.dumps(info) and out.name in info["source"], info["source"]


def test_a_stuck_forward_pass_times_out_fails_health_and_is_replaced(guarded):
    """X-VDVAE-Fault: hang blocks the forward pass for good: the request gets 504 after
    serve.request_timeout_s, /healthz turns 503, Serve's health check replaces the replica,
    and the app serves again (the old replica would hold its lock forever)."""
    import time

    r = requests.post(guarded + "/sample", json={"n": 1}, headers={**auth(), "X-VDVAE-Fault": "hang"}, timeout=60)
    assert r.status_code == 504 and r.json()["field"] == "request", r.text
    statuses = []
    deadline = time.monotonic() + 120  # bounds the wait for Serve to replace the replica
    while time.monotonic() < deadline:
        statuses.append(requests.get(guarded + "/healthz", timeout=30).status_code)
        if 503 in statuses and statuses[-1] == 200:
            break
        time.sleep(0.2)
    assert 503 in statuses and statuses[-1] == 200, statuses
    r = requests.post(guarded + "/sample", json={"n": 1, "seed": 1}, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
