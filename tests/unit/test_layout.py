"""Layouts and presets against the official configurations."""
import json
from pathlib import Path

import pytest
import torch

from vdvae_dist.config import load
from vdvae_dist.config.layout import format_decoder, format_encoder, parse
from vdvae_dist.model import build_model, count_parameters
from vdvae_dist.official.hparams import evd_model_config, read_evd_cfg, vdvae_model_config

REF = Path(__file__).resolve().parents[1] / "reference"


@pytest.mark.parametrize("case, preset", [("evd-cifar10", "cifar10"), ("evd-imagenet32", "imagenet32"),
                                          ("evd-ffhq256-8bit", "ffhq256"), ("evd-mnist", "mnist")])
def test_presets_hold_the_official_efficient_layouts(case, preset):
    ours = evd_model_config(json.loads((REF / case / "hparams.json").read_text()))
    m = load(preset).model
    assert (ours["encoder"], ours["decoder"]) == (m.encoder, m.decoder)


# openai/vdvae hps.py (facts): enc_blocks, dec_blocks; parameter counts of the official VAE
# built from each set (--hps NAME), counted by instantiating it
OPENAI = {
    "cifar10": ("32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3", "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21", 39_145_700),
    "imagenet32": ("32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6", "1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40", 119_280_868),
    "imagenet64": ("64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
                   "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12", 125_005_860),
    "ffhq256": ("256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
                "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128", 114_874_852),
    "ffhq1024": ("1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
                 "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,512m256,1024m512",
                 109_366_904),
}
# width, custom_width_str, num_mixtures where a set differs from imagenet32's (512, "", 10)
OPENAI_WIDTHS = {"cifar10": (384, "", 10),
                 "ffhq1024": (16, "512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512", 2)}


@pytest.mark.parametrize("name", list(OPENAI))
def test_original_presets_hold_the_openai_sets(name):
    enc, dec, count = OPENAI[name]
    width, custom, mixtures = OPENAI_WIDTHS.get(name, (512, "", 10))
    m = load(f"vdvae-{name}").model
    ours = vdvae_model_config({"width": width, "custom_width_str": custom, "zdim": 16, "num_mixtures": mixtures, "enc_blocks": enc,
                               "dec_blocks": dec, "dataset": {"ffhq256": "ffhq_256", "ffhq1024": "ffhq_1024"}.get(name, name)})
    for key, value in ours.items():
        assert getattr(m, key) == value, key
    with torch.device("meta"):
        assert count_parameters(build_model(m)) == count


def test_evd_cfg_reader_and_format_round_trip():
    text = "[data]\n# a comment\ntarget_res = 32\nname = cifar10_baseline\n[model]\nup = [1] * 3 + [2]\nk = (1, 1)\n"
    hp = read_evd_cfg(text)
    assert hp == {"data": {"target_res": 32, "name": "cifar10_baseline"}, "model": {"up": [1, 1, 1, 2], "k": (1, 1)}}
    assert read_evd_cfg("[m]\nx = __import__('os').system('true')\n")["m"]["x"].startswith("__import__")  # kept as text
    m = load("ffhq256-5bit").model
    lay = parse(m.encoder, m.decoder, m.resolution)
    assert (format_encoder(lay.encoder), format_decoder(lay.decoder)) == (m.encoder, m.decoder)


def test_skips_pair_in_mirror_order_per_resolution():
    lay = parse("4x1,4s2,4p4,1s1", "1s1,4u4,4s1,4x3", 4)
    blocks = lay.blocks
    # skips are sent as [4 px (first), 4 px (second), 1 px]: the first 4 px entry reads the last 4 px skip
    assert [b.skip for b in blocks] == [2, 1, 0, 0, 0]


def test_an_official_cfg_value_cannot_allocate_a_huge_list():
    from vdvae_dist.official.hparams import MAX_LIST_ITEMS, literal

    assert literal("[1] * 11 + [2]", "x") == [1] * 11 + [2] and literal("2 * (3,)", "x") == (3, 3)
    for expr in ("[0] * 1000000000", "1000000 * 1000 * [0]", "'a' * 10000000", f"[0] * {MAX_LIST_ITEMS} + [1]"):
        with pytest.raises(ValueError, match=r"line 7 \(strides\): a list of [\d,]+ items is out of range; allowed: "
                                             r"at most 100,000"):
            literal(expr, "line 7 (strides)")
