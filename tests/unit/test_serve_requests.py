"""Request checks, image preparation and batching plan of the sampling service (no Ray)."""
import io

import numpy as np
import pytest
from PIL import Image

from vdvae_dist.serve.requests import Limits, RequestError, SampleRequest, form_value, npy_bytes, png_bytes
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
