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


def _dtype_seen_in_a_block(precision: str, monkeypatch=None, cpu_flags=None) -> tuple[bool, torch.dtype, torch.dtype]:
    """(rule.bf16, the dtype a convolution inside a decoder block computed in, the loss's
    dtype) of one training forward pass of the torch rule on the CPU; `cpu_flags` replaces
    what /proc/cpuinfo says."""
    from vdvae_dist.config import load
    from vdvae_dist.core import precision as module
    from vdvae_dist.model import build_model
    from vdvae_dist.model.blocks import TopDownBlock
    from vdvae_dist.train.torch_rule import TorchRule

    if cpu_flags is not None:
        monkeypatch.setattr(module, "_cpu_flags_and_model", lambda: (set(cpu_flags), "test CPU"))
    cfg = load("tiny", overrides=[f"engine.precision={precision}", "engine.device=cpu", "optim.batch_size=2"])
    torch.manual_seed(0)
    rule = TorchRule(build_model(cfg.model), cfg, torch.device("cpu"))
    block = next(m for m in rule.module.modules() if isinstance(m, TopDownBlock))
    conv = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    elbo = rule.forward(x.contiguous(memory_format=torch.channels_last))
    assert seen
    return rule.bf16, seen[0], elbo.nelbo.dtype


def test_bf16_reaches_the_blocks_under_autocast_and_the_loss_stays_fp32():
    assert _dtype_seen_in_a_block("bf16") == (True, torch.bfloat16, torch.float32)
    assert _dtype_seen_in_a_block("fp32") == (False, torch.float32, torch.float32)


@pytest.mark.parametrize("flags, bf16", [({"avx2", "avx512f"}, False), ({"avx2", "avx512_bf16"}, True),
                                         ({"amx_bf16"}, True)])
def test_auto_trains_in_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, flags, bf16):
    want = torch.bfloat16 if bf16 else torch.float32
    assert _dtype_seen_in_a_block("auto", monkeypatch, flags) == (bf16, want, torch.float32)


@pytest.mark.parametrize("emulated_only, native", [(True, False), (False, True)])
def test_a_gpu_that_only_emulates_bf16_is_not_native(monkeypatch, emulated_only, native):
    """torch.cuda.is_bf16_supported() says True on GPUs before compute capability 8.0 (it
    counts emulation) unless asked for native support: answers of such a GPU (V100) and of
    an A100, given to core/precision.py through torch's own functions."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated_only)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "V100" if emulated_only else "A100")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    caps = capabilities(torch.device("cuda"))
    assert caps == Capabilities("cuda", "V100" if emulated_only else "A100", native)
    assert resolve("auto", torch.device("cuda")).bf16 == native
