"""The sampling service over real HTTP: a Serve app on 127.0.0.1 in a local Ray cluster,
serving EMA weights the single-process trainer wrote."""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

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
                                  "train.log_every=20", f"train.output={out}", "data.loader_workers=0"])
    summary = train_local(cfg, log=lambda *_: None)
    return out, summary


@pytest.fixture(scope="module")
def service(trained):
    import ray
    from ray import serve

    from vdvae_dist.serve.app import run

    out, _ = trained
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    cfg = load("tiny", overrides=["serve.host=127.0.0.1", f"serve.port={port}", "serve.max_n=16",
                                  "serve.max_batch_size=16", "serve.batch_wait_s=0.05", "serve.max_body_mb=1"])
    try:
        url = run(str(out), cfg, blocking=False)
        wait_for_http(url + "/healthz", timeout_s=120)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


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
    assert info["parameters"] > 100_000
    assert info["training_metrics"]["test_bits_per_dim"] == pytest.approx(summary["test_bits_per_dim"])
    assert info["source"].endswith("ema_fp32.pt")
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
    from vdvae_dist.data.readers import resize_center_crop, skimage_crops

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
])
def test_bad_input_gets_a_json_4xx_naming_the_field(service, path, kw, status, field, allowed):
    r = post(service, path, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field and allowed in body["allowed"], body
    assert requests.get(service + "/healthz", timeout=30).status_code == 200  # the replica survived
