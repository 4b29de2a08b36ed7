"""engine.precision's decision table, with the device's capabilities injected."""
import pytest
import torch

from vdvae_dist.core.precision import Capabilities, capabilities, choose, resolve

AVX512_BF16_CPU = Capabilities("cpu", "EPYC with AVX512-BF16", True)
AVX2_CPU = Capabilities("cpu", "EPYC with AVX2 only", False)
AMPERE = Capabilities("cuda", "A100", True)
VOLTA = Capabilities("cuda", "V100", False)


@pytest.mark.parametrize("setting, caps, want", [
    ("auto", AVX512_BF16_CPU, "bf16"), ("auto", AVX2_CPU, "fp32"), ("auto", AMPERE, "bf16"), ("auto", VOLTA, "fp32"),
    ("fp32", AVX512_BF16_CPU, "fp32"), ("fp32", AMPERE, "fp32"),
    ("bf16", AVX2_CPU, "bf16"), ("bf16", VOLTA, "bf16"), ("bf16", AMPERE, "bf16")])
def test_decision_table(setting, caps, want):
    p = choose(setting, caps)
    assert p.name == want and p.bf16 == (want == "bf16")


def test_the_reason_says_why():
    assert str(choose("auto", AVX2_CPU)).startswith("fp32 (auto: cpu EPYC with AVX2 only: no native bf16")
    assert "bf16 is native" in choose("auto", AMPERE).reason
    assert "expect it to be slow" in choose("bf16", VOLTA).reason  # forced where it is emulated
    assert choose("fp32", AMPERE).reason == "engine.precision=fp32"
    with pytest.raises(ValueError, match="engine.precision='fp16' is unknown; allowed: auto | fp32 | bf16"):
        choose("fp16", AMPERE)


def test_this_cpu_is_read_from_its_flags():
    flags = open("/proc/cpuinfo").read().split()
    caps = capabilities(torch.device("cpu"))
    assert caps.native_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert resolve("auto", torch.device("cpu")).bf16 == caps.native_bf16
