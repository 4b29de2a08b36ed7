"""Request checks, image preparation and batching plan of the sampling service (no Ray)."""
import io

import numpy as np
import pytest
from PIL import Image

from vdvae_dist.artifacts.images import png_bytes
from vdvae_dist.serve.requests import Limits, RequestError, SampleRequest, form_value, npy_bytes
from vdvae_dist.serve.sampler import pack

LIMITS = Limits(max_n=16, groups=4, channels=3, resolution=32)


def _err(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


def test_temperature_one_value_or_one_per_group():
    assert LIMITS.temperature(0.5) == [0.5] * 4
    assert LIMITS.temperature([0.1, 0.2, 0.3, 0.4]) == [0.1, 0.2, 0.3, 0.4]
    e = _err(LIMITS.temperature, [1.0, 1.0])
    assert e.field == "temperature" and "exactly 4" in e.allowed and e.status == 422
    assert "out of range" in _err(LIMITS.temperature, [1.0, float("nan"), 1.0, 1.0]).error
    assert _err(LIMITS.temperature, -0.1).field == "temperature"


def test_sample_request_ranges():
    assert LIMITS.sample(SampleRequest(n=16, seed=3)) == {"n": 16, "temperature": [1.0] * 4, "seed": 3}
    assert _err(LIMITS.sample, SampleRequest(n=17)).allowed == "1..16"
    assert _err(LIMITS.sample, SampleRequest(n=2, grid=False)).field == "grid"
    assert _err(LIMITS.sample, SampleRequest(seed=2**63)).field == "seed"
    assert LIMITS.depth(4) == 4 and _err(LIMITS.depth, 5).allowed == "0..4"


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=200 if mode == "L" else (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_are_resized_and_cropped_like_training_images():
    x = LIMITS.image(_png((64, 48)))
    assert x.shape == (3, 32, 32) and x.dtype == np.uint8 and tuple(x[:, 5, 5]) == (200, 10, 10)
    gray = Limits(4, 2, 1, 28).image(_png((40, 40), "RGB"))
    assert gray.shape == (1, 28, 28)
    e = _err(LIMITS.image, b"GIF89a not really")
    assert (e.field, e.status) == ("image", 400)


def test_form_values_parse_numbers_and_json_lists():
    assert form_value("depth", "3", "int") == 3
    assert form_value("temperature", "[0.5, 1]", "temperature") == [0.5, 1]
    assert form_value("temperature", "0.7", "temperature") == 0.7
    assert form_value("seed", None, "int") is None
    assert _err(form_value, "depth", "two", "int").field == "depth"


def test_encoders_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(images)), allow_pickle=False), images)
    back = np.asarray(Image.open(io.BytesIO(png_bytes(images[0].transpose(1, 2, 0)))))
    assert np.array_equal(back, images[0].transpose(1, 2, 0))


def test_pack_never_splits_a_request_and_respects_the_image_budget():
    jobs = [{"n": n} for n in (3, 3, 2, 8, 1)]
    groups = pack(jobs, 8)
    assert groups == [[0, 1, 2], [3], [4]]
    assert all(sum(jobs[i]["n"] for i in g) <= 8 for g in groups)


# --- audit (issue 11): numeric fields, image bombs and formats, URIs, batch isolation ---------------

def test_numbers_are_bounded_and_booleans_are_not_numbers():
    from pydantic import ValidationError

    from vdvae_dist.serve.requests import MAX_TEMPERATURE, ReconstructRequest

    assert LIMITS.temperature(MAX_TEMPERATURE) == [MAX_TEMPERATURE] * 4
    for bad in (MAX_TEMPERATURE + 0.5, 1e308, float("inf"), 10**400, [1.0, 1.0, 1.0, 1e308], [True] * 4, True):
        e = _err(LIMITS.temperature, bad)  # 10**400: a RequestError, not an OverflowError
        assert e.field == "temperature" and f"<= {MAX_TEMPERATURE:g}" in e.allowed
    assert _err(LIMITS.depth, True).field == "depth"
    assert _err(LIMITS.seed, True).field == "seed"
    assert _err(LIMITS.seed, 10**400).field == "seed"
    for fields in ({"n": True}, {"seed": False}, {"temperature": True}, {"n": 2.0}, {"n": "2"}, {"grid": 1}):
        with pytest.raises(ValidationError):
            SampleRequest(**fields)
    with pytest.raises(ValidationError):
        ReconstructRequest(image_base64="", depth=True)


def test_form_values_refuse_booleans_and_huge_digit_strings():
    for raw in ("true", "9" * 5000, "1" * 41, "2.0"):
        e = _err(form_value, "depth", raw, "int")  # "9" * 5000 used to raise a bare ValueError (a 500)
        assert e.field == "depth" and e.status == 422
    for raw in ("true", "[true, 1]", "[1, null]", "9" * 5000 + "]", "[" + "1," * 40000 + "1]"):
        assert _err(form_value, "temperature", raw, "temperature").field == "temperature"
    assert form_value("seed", "9" * 19, "int") == int("9" * 19)  # in range for the int check; Limits bounds it


def _encoded(size, fmt, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=(200, 10, 10) if mode == "RGB" else 200).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "PPM", "ICO", "EPS"])
def test_only_png_jpeg_webp_and_bmp_are_decoded(fmt):
    e = _err(LIMITS.image, _encoded((40, 40), fmt))
    assert (e.field, e.status) == ("image", 400) and "PNG, JPEG, WebP or BMP" in e.allowed


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_allowed_formats_decode(fmt):
    assert LIMITS.image(_encoded((48, 40), fmt)).shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(1, 20_000), (20_000_000, 1), (1000, 62)])
def test_thin_images_are_refused_before_decoding(size):
    data = _encoded(size, "PNG", mode="L")  # a few hundred bytes to 20 KB
    e = _err(LIMITS.image, data)
    assert (e.field, e.status) == ("image", 422) and "times the shorter" in e.allowed


def test_uri_credentials_are_redacted():
    from vdvae_dist.serve.requests import redact_uri

    assert (redact_uri("http://alice:s3cret@example.com:8080/runs/ema_fp32.pt")
            == "http://example.com:8080/runs/ema_fp32.pt")
    assert redact_uri("s3://KEY:SECRET@bucket/run/ema_fp32.pt") == "s3://bucket/run/ema_fp32.pt"
    assert redact_uri("https://host/ema_fp32.pt?X-Amz-Signature=abc") == "https://host/ema_fp32.pt"
    for plain in ("/runs/x/ema_fp32.pt", "file:///runs/ema_fp32.pt", "runs:/0123/model/ema_fp32.pt", "gs://b/k"):
        assert redact_uri(plain) == plain


def test_a_failing_job_fails_alone_in_its_forward_pass():
    """Test-only fault hook (serve.fault_injection): "raise" makes the forward pass that holds
    the job fail; the Sampler re-runs the other jobs of that pass one by one."""
    import torch

    from vdvae_dist.artifacts.weights import Weights
    from vdvae_dist.config import load
    from vdvae_dist.model import build_model
    from vdvae_dist.serve.sampler import Sampler

    cfg = load("tiny")
    torch.manual_seed(0)
    sampler = Sampler(Weights(build_model(cfg.model).eval(), cfg, 0, "test"), torch.device("cpu"), max_images=8)
    temps = [1.0] * sampler.model.num_groups
    jobs = [{"n": 1, "temperature": temps, "seed": s} for s in range(3)]
    solo = [sampler.sample_many([job])[0] for job in jobs]
    out = sampler.sample_many([jobs[0], {**jobs[1], "fault": "raise"}, jobs[2]])  # one forward pass of three
    assert isinstance(out[1], RuntimeError) and "injected fault" in str(out[1])
    assert np.array_equal(out[0], solo[0]) and np.array_equal(out[2], solo[2])


def test_a_missing_token_names_where_to_put_it_and_not_runtime_env(monkeypatch):
    from vdvae_dist.serve.guards import token_from_env

    monkeypatch.delenv("VDVAE_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError) as e:
        token_from_env("VDVAE_TEST_TOKEN")
    message = str(e.value)
    assert "VDVAE_TEST_TOKEN is unset or empty" in message and "on the Serve nodes" in message
    assert "not runtime_env" in message  # the dashboard shows runtime_env in plain text (issue 23 N9)
    monkeypatch.setenv("VDVAE_TEST_TOKEN", " t0k ")
    assert token_from_env("VDVAE_TEST_TOKEN") == "t0k" and token_from_env("") == ""


def test_the_decode_budget_follows_the_models_resolution():
    """Issue 23 N2: a 32-px model refuses a 2048x2048 WebP of one colour (a few hundred
    bytes that decode to 4 megapixels) before decoding it, naming the budget; larger
    models get a budget in proportion, never over MAX_UPLOAD_PIXELS."""
    from vdvae_dist.serve.requests import MAX_UPLOAD_PIXELS, MIN_UPLOAD_PIXELS, UPLOAD_PIXELS_PER_MODEL_PIXEL

    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048), color=(200, 10, 10)).save(buf, format="WEBP", lossless=True)
    bomb = buf.getvalue()
    assert len(bomb) < 2000
    e = _err(LIMITS.image, bomb)
    assert (e.field, e.status) == ("image", 422) and "2048x2048 pixels is too large" in e.error
    assert f"at most {MIN_UPLOAD_PIXELS:,} pixels" in e.allowed and "32x32 model" in e.allowed
    assert LIMITS.image(_encoded((1024, 1024), "WEBP")).shape == (3, 32, 32)  # within the budget: decoded
    assert Limits(4, 8, 3, 256).max_pixels == UPLOAD_PIXELS_PER_MODEL_PIXEL * 256 * 256
    assert Limits(4, 8, 3, 1024).max_pixels == MAX_UPLOAD_PIXELS


def test_info_shows_no_local_path_of_the_weights():
    from vdvae_dist.serve.requests import shown_source

    assert shown_source("/home/alice/runs/cifar/ema_fp32.pt") == "cifar/ema_fp32.pt"
    assert shown_source("/home/alice/runs/cifar") == "runs/cifar"
    assert shown_source("http://alice:pw@host:80/runs/ema_fp32.pt") == "http://host:80/runs/ema_fp32.pt"
    assert shown_source("runs:/0123/model/ema_fp32.pt") == "runs:/0123/model/ema_fp32.pt"
