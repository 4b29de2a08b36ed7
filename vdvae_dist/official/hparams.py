"""The two official implementations' hyperparameters and checkpoints, in our terms.

Efficient-VDVAE (Rayhane-mamah/Efficient-VDVAE, PyTorch) describes a network by per-entry
lists (`up_strides`, `up_n_blocks_per_res`, `down_strides`, `down_n_blocks_per_res`, ...);
openai/vdvae by block strings (`enc_blocks`, `dec_blocks`) and a named hparam set. Both
translate exactly into our layout grammar (config/layout.py). Their state dicts map one
to one, by role, onto ours; the mapping is built from the same walk as the layout.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any

from ..config.layout import DecoderUnit, EncoderUnit, Layout, format_decoder, format_encoder

# -- Efficient-VDVAE ----------------------------------------------------------------------

_EVD_FIXED = {  # settings our efficient design implements; anything else is refused
    "distribution_base": "std", "output_distribution_base": "std", "use_residual_distribution": False,
    "use_1x1_conv": True,
}


def _per_res(name: str, pairs: list[tuple[int, Any]]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for i, (res, value) in enumerate(pairs):
        if out.setdefault(res, value) != value:
            raise ValueError(f"{name}: entry {i} gives {value!r} at {res} px where an earlier entry gives "
                             f"{out[res]!r}; this layout needs one value per resolution")
    return out


def _split_default(table: dict[int, Any]) -> tuple[Any, dict[int, Any]]:
    default = Counter(table.values()).most_common(1)[0][0]
    return default, {r: v for r, v in sorted(table.items(), reverse=True) if v != default}


def evd_walk(model: dict, target_res: int) -> tuple[list[EncoderUnit], list[DecoderUnit]]:
    """Our units for Efficient-VDVAE's per-entry lists, in execution order."""
    enc: list[EncoderUnit] = []
    res = target_res
    for i, stride in enumerate(model["up_strides"]):
        enc += [EncoderUnit("cell", res)] * model["up_n_blocks_per_res"][i] + [EncoderUnit("skip", res)]
        if stride > 1:
            enc.append(EncoderUnit("pool", res, stride))
            res //= stride
    dec: list[DecoderUnit] = []
    for i, stride in enumerate(model["down_strides"]):
        if stride > 1:
            res *= stride
            dec.append(DecoderUnit("unpool", res, stride))
        dec += [DecoderUnit("block", res, entry=i)] * (1 + model["down_n_blocks_per_res"][i])
    return enc, dec


def evd_model_config(hp: dict) -> dict[str, Any]:
    """Our `model` table from Efficient-VDVAE hyperparameters ({data: ..., model: ..., loss: ...})."""
    data, model, loss = hp["data"], hp["model"], hp.get("loss", {})
    for key, want in _EVD_FIXED.items():
        if key in model and model[key] != want:
            raise ValueError(f"model.{key}={model[key]!r} is not supported; allowed: {want!r}")
    n_up, n_down = len(model["up_strides"]), len(model["down_strides"])
    for key in ("up_n_blocks_per_res", "up_n_blocks", "up_n_layers", "up_filters", "up_mid_filters_ratio",
                "up_kernel_size", "up_skip_filters"):
        if len(model[key]) != n_up:
            raise ValueError(f"model.{key} has {len(model[key])} entries; allowed: one per up_strides entry ({n_up})")
    for key in ("down_n_blocks_per_res", "down_n_blocks", "down_n_layers", "down_filters",
                "down_mid_filters_ratio", "down_kernel_size", "down_latent_variates"):
        if len(model[key]) != n_down:
            raise ValueError(f"model.{key} has {len(model[key])} entries; allowed: one per down_strides entry "
                             f"({n_down})")
    for key, want in (("up_n_blocks", 1), ("down_n_blocks", 1), ("up_n_layers", 2), ("down_n_layers", 2)):
        bad = [i for i, v in enumerate(model[key]) if v != want]
        if bad:
            raise ValueError(f"model.{key}[{bad[0]}]={model[key][bad[0]]!r} is not supported; allowed: {want} "
                             "(every official configuration)")
    for key in ("input_kernel_size", "output_kernel_size"):
        if list(model.get(key, [1, 1])) != [1, 1]:
            raise ValueError(f"model.{key}={model[key]!r} is not supported; allowed: (1, 1)")
    latents = set(model["down_latent_variates"])
    if len(latents) != 1:
        raise ValueError(f"model.down_latent_variates={model['down_latent_variates']!r}: allowed: one value for "
                         "every entry")
    target = int(data["target_res"])
    enc, dec = evd_walk(model, target)
    # widths, bottlenecks and kernels are per resolution in both official codes' configs
    in_ch = [model["input_conv_filters"]] + list(model["up_filters"][:-1])
    res_up = [u.res for u in enc if u.kind == "skip"]
    blocks = [u for u in dec if u.kind == "block"]
    res_down = [u.res for n, u in enumerate(blocks) if n == 0 or u.entry != blocks[n - 1].entry]  # entry i's res
    widths = _per_res("model.up_filters / down_filters", list(zip(res_up, in_ch)) + list(zip(res_down, model["down_filters"]))
                      + list(zip(res_up, model["up_skip_filters"])))
    low = res_down[0]
    if model["down_filters"][0] != widths[low]:
        raise ValueError(f"model.down_filters[0]={model['down_filters'][0]} differs from the width at {low} px")
    ratios = _per_res("model.up_mid_filters_ratio / down_mid_filters_ratio",
                      list(zip(res_up, model["up_mid_filters_ratio"])) + list(zip(res_down, model["down_mid_filters_ratio"])))
    for key, res_list in (("up_kernel_size", res_up), ("down_kernel_size", res_down)):
        for i, (r, k) in enumerate(zip(res_list, model[key])):
            if k != (3 if r > 2 else 1):
                raise ValueError(f"model.{key}[{i}]={k} at {r} px is not supported; allowed: 3 above 2 px, else 1")
    width, width_table = _split_default(widths)
    ratio, ratio_table = _split_default(ratios)
    binary = data.get("dataset_source") == "binarized_mnist"
    out = {
        "design": "efficient", "resolution": target, "channels": int(data["channels"]),
        "pad": 2 if binary else 0, "width": int(width), "widths": {r: int(w) for r, w in width_table.items()},
        "bottleneck": float(ratio), "bottlenecks": {r: float(v) for r, v in ratio_table.items()},
        "encoder": format_encoder(enc), "decoder": format_decoder(dec),
        "latent_channels": int(latents.pop()),
        "likelihood": "bernoulli" if binary else "dmol",
        "mixtures": int(model.get("num_output_mixtures", 10)),
        "num_bits": 1 if binary else int(data["num_bits"]),
        "latent_softplus_beta": float(model["gradient_smoothing_beta"]),
        "output_softplus_beta": float(model["output_gradient_smoothing_beta"]),
        "output_min_log_scale": float(loss.get("min_mol_logscale", -250.0)),
    }
    return out


_BLOCK = {"prior_net.0.convs.": "prior.net.", "prior_layer.projection.": "prior_proj.",
          "posterior_net.0.convs.": "posterior.net.", "posterior_layer.projection.": "posterior_proj.",
          "z_projection.": "z_proj.", "residual_block.0.convs.": "resnet.net."}


def evd_key_prefixes(layout: Layout) -> dict[str, str]:
    """Efficient-VDVAE state-dict prefix -> ours. Its bottom-up entry i holds the extra
    cells before a skip (levels_up[i][j]), the skip cell and the pool after it
    (levels_up_downsample[i]); top-down entry i holds an unpool and the first block
    (levels_down_upsample[i]) and the blocks that share its skip (levels_down[i][j])."""
    out = {"bottom_up.input_conv.": "input_conv.", "top_down.trainable_h": "start.value",
           "top_down.output_conv.": "output_conv."}
    i = j = 0
    for n, u in enumerate(layout.encoder):
        if u.kind == "cell":
            out[f"bottom_up.levels_up.{i}.{j}.residual_block.0.convs."] = f"encoder.{n}.cell.net."
            j += 1
        elif u.kind == "skip":
            out[f"bottom_up.levels_up_downsample.{i}.residual_block.0.convs."] = f"encoder.{n}.cell.net."
            out[f"bottom_up.levels_up_downsample.{i}.skip_projection."] = f"encoder.{n}.skip_proj."
            i, j = i + 1, 0
        else:
            out[f"bottom_up.levels_up_downsample.{i - 1}.pool.ops.0."] = f"encoder.{n}.conv."
    entry, j = -1, 0
    for n, u in enumerate(layout.decoder):
        if u.kind == "unpool":
            out[f"top_down.levels_down_upsample.{entry + 1}.unpool.ops.0."] = f"decoder.{n}.conv."
            out[f"top_down.levels_down_upsample.{entry + 1}.unpool.scale_bias"] = f"decoder.{n}.bias"
            continue
        if u.entry != entry:
            entry, j = u.entry, 0
            prefix = f"top_down.levels_down_upsample.{entry}."
        else:
            prefix = f"top_down.levels_down.{entry}.{j}."
            j += 1
        out.update({prefix + theirs: f"decoder.{n}.{mine}" for theirs, mine in _BLOCK.items()})
    return out


# -- openai/vdvae --------------------------------------------------------------------------

# Per-dataset input standardisation of openai/vdvae's data.py, as (mean, std) of 8-bit
# pixels (ffhq_1024 standardises [0, 1] pixels: mean 0.4387, std 0.2743), and bit depth
VDVAE_DATASETS = {
    "cifar10": (120.63838, 64.16736, 8, 32),
    "imagenet32": (116.2373, 69.37404, 8, 32),
    "imagenet64": (115.92961967, 69.37404, 8, 64),
    "ffhq_256": (112.8666757481, 69.84780273, 5, 256),
    "ffhq_1024": (0.4387 * 255, 0.2743 * 255, 8, 1024),
}
_VDVAE_TOKEN = re.compile(r"^(\d+)(?:([xmd])(\d+))?$")


def _vdvae_blocks(text: str, key: str) -> list[tuple[int, str, int]]:
    """openai's block string -> [(res, kind, arg)] with kind "" (plain), "d" or "m"."""
    out = []
    for tok in text.split(","):
        m = _VDVAE_TOKEN.match(tok.strip())
        if not m:
            raise ValueError(f"{key} entry {tok!r} is not understood; allowed: RxN, RdK, RmM or R")
        res, kind, arg = int(m.group(1)), m.group(2) or "", int(m.group(3) or 1)
        if kind == "x":
            out.extend((res, "", 0) for _ in range(arg))
        else:
            out.append((res, kind, arg))
    return out


def vdvae_walk(enc_blocks: str, dec_blocks: str) -> tuple[list[EncoderUnit], list[DecoderUnit]]:
    """Our units for openai's block strings, in execution order."""
    enc = _vdvae_blocks(enc_blocks, "enc_blocks")
    dec = _vdvae_blocks(dec_blocks, "dec_blocks")
    dec_res = {r for r, _, _ in dec}
    if any(kind == "m" for _, kind, _ in enc):
        raise ValueError("enc_blocks holds an 'm' (mixin) entry; allowed in dec_blocks only")
    # the skip at resolution r is the last state computed at r: the output of the last
    # plain block before the block that pools away from r (or of the lowest resolution's last)
    enc_units: list[EncoderUnit] = []
    k = 0
    while k < len(enc):
        res = enc[k][0]
        seg = []
        while k < len(enc) and enc[k][0] == res and not (seg and seg[-1][1] == "d"):
            seg.append((k, *enc[k][1:]))
            k += 1
        pools = seg[-1][1] == "d"
        plain = seg[:-1] if pools else seg
        if any(kind == "d" for _, kind, _ in plain):
            raise ValueError(f"enc_blocks: a 'd' block at {res} px is followed by more blocks at {res} px")
        if res in dec_res and not plain:
            raise ValueError(f"enc_blocks entry '{res}d{seg[-1][2]}': no plain block runs at {res} px before it, so "
                             f"its skip would be the block's input; this layout cannot express a skip without a cell")
        for n in range(len(plain)):
            enc_units.append(EncoderUnit("skip" if (n == len(plain) - 1 and res in dec_res) else "cell", res))
        if pools:
            enc_units += [EncoderUnit("cell", res), EncoderUnit("pool", res, seg[-1][2])]
            if k < len(enc) and enc[k][0] != res // seg[-1][2]:
                raise ValueError(f"enc_blocks: after '{res}d{seg[-1][2]}' the next block runs at {enc[k][0]} px, "
                                 f"not {res // seg[-1][2]} px")
        elif k < len(enc):
            raise ValueError(f"enc_blocks: the blocks at {res} px end without a 'd' block, but more blocks follow")
    dec_units: list[DecoderUnit] = []
    entry, prev = -1, None
    for idx, (res, kind, arg) in enumerate(dec):
        if kind == "d":
            raise ValueError("dec_blocks holds a 'd' (down) entry; allowed in enc_blocks only")
        if res != prev:
            if prev is not None:
                if kind != "m" or arg != prev or res % prev:
                    raise ValueError(f"dec_blocks entry {idx} ({res} px) changes resolution from {prev} px without "
                                     f"an '{res}m{prev}' block; this layout upsamples only from the previous resolution")
                dec_units.append(DecoderUnit("unpool", res, res // prev))
            elif kind == "m":
                raise ValueError(f"dec_blocks starts with a mixin block '{res}m{arg}'")
            entry += 1
        elif kind == "m":
            raise ValueError(f"dec_blocks entry {idx}: a mixin block '{res}m{arg}' inside the {res} px blocks")
        dec_units.append(DecoderUnit("block", res, entry=entry))
        prev = res
    return enc_units, dec_units


def _width_table(custom: str) -> dict[int, int]:
    table = {}
    for item in filter(None, (custom or "").split(",")):
        r, w = item.split(":")
        table[int(r)] = int(w)
    return table


def vdvae_model_config(H: dict) -> dict[str, Any]:
    """Our `model` table from openai/vdvae hyperparameters (the dict `H`)."""
    dataset = H.get("dataset", "cifar10")
    if dataset not in VDVAE_DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; allowed: {', '.join(VDVAE_DATASETS)}")
    mean, std, bits, size = VDVAE_DATASETS[dataset]
    size = int(H.get("image_size") or size)
    enc, dec = vdvae_walk(H["enc_blocks"], H["dec_blocks"])
    resolutions = {u.res for u in enc} | {u.res for u in dec}
    table = _width_table(H.get("custom_width_str", ""))
    widths = {r: table.get(r, H["width"]) for r in resolutions}
    width, width_table = _split_default(widths)
    return {
        "design": "original", "resolution": size, "channels": 3, "pad": 0,
        "width": int(width), "widths": width_table, "bottleneck": float(H.get("bottleneck_multiple", 0.25)),
        "bottlenecks": {},
        "encoder": format_encoder(enc), "decoder": format_decoder(dec),
        "latent_channels": int(H["zdim"]), "likelihood": "dmol", "mixtures": int(H.get("num_mixtures", 10)),
        "num_bits": bits, "no_bias_above": int(H.get("no_bias_above", 64)),
        "input_mean": float(mean), "input_std": float(std),
    }


def vdvae_key_prefixes(layout: Layout, no_bias_above: int) -> dict[str, str]:
    """openai/vdvae state-dict prefix -> ours: its encoder blocks are our cells in order
    (pools hold no weights), its decoder blocks our blocks; `bias_xs` (one per decoder
    resolution up to no_bias_above, lowest first) are our start and unpool biases."""
    out = {"encoder.in_conv.": "input_conv.", "decoder.out_net.out_conv.": "output_conv.",
           "decoder.gain": "output_affine.gain", "decoder.bias": "output_affine.bias"}
    convs = {f"c{i}.": f"net.{2 * i - 1}." for i in range(1, 5)}
    cells = [n for n, u in enumerate(layout.encoder) if u.kind != "pool"]
    for k, n in enumerate(cells):
        out.update({f"encoder.enc_blocks.{k}.{c}": f"encoder.{n}.cell.{m}" for c, m in convs.items()})
    blocks = [n for n, u in enumerate(layout.decoder) if u.kind == "block"]
    for k, n in enumerate(blocks):
        base = f"decoder.dec_blocks.{k}."
        for theirs, mine in (("enc.", "posterior."), ("prior.", "prior."), ("resnet.", "resnet.")):
            out.update({base + theirs + c: f"decoder.{n}.{mine}{m}" for c, m in convs.items()})
        out[base + "z_proj."] = f"decoder.{n}.z_proj."
    unpool_at = {u.res: n for n, u in enumerate(layout.decoder) if u.kind == "unpool"}
    with_bias = [r for r in sorted({u.res for u in layout.decoder}) if r <= no_bias_above]
    for j, r in enumerate(with_bias):
        out[f"decoder.bias_xs.{j}"] = "start.value" if r == layout.lowest else f"decoder.{unpool_at[r]}.bias"
    return out


def rename(state: dict, prefixes: dict[str, str]) -> dict:
    """Official keys -> ours by the longest matching prefix; keys no prefix covers keep
    their name (a strict load then names them)."""
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for p in ordered:
            if key.startswith(p):
                key = prefixes[p] + key[len(p):]
                break
        out[key] = value
    return out


# -- reading official files ------------------------------------------------------------------

_ALLOWED_NODES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.BinOp, ast.Add, ast.Mult, ast.Sub,
                  ast.Div, ast.UnaryOp, ast.USub, ast.UAdd, ast.Load)


def literal(expr: str, where: str) -> Any:
    """Evaluate one value of an Efficient-VDVAE .cfg file: literals, lists and tuples joined
    by + and *, as its configs write them (`[1] * 11 + [2]`). Anything else is kept as the
    bare text (`name = cifar10_baseline`), as its hparams reader does; nothing else runs."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return expr.strip()
    if not all(isinstance(node, _ALLOWED_NODES) for node in ast.walk(tree)):
        return expr.strip()
    return _value(tree.body, where)


MAX_LIST_ITEMS = 100_000  # far above any official config's lists; `[0] * 10**9` would take GBs


def _value(node: ast.AST, where: str) -> Any:
    """The value of a tree of _ALLOWED_NODES, with every list, tuple or string it builds
    capped at MAX_LIST_ITEMS before it is built."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.UnaryOp):
        v = _value(node.operand, where)
        return -v if isinstance(node.op, ast.USub) else +v
    a, b = _value(node.left, where), _value(node.right, where)
    if isinstance(node.op, ast.Mult) and isinstance(a, int) and isinstance(b, (list, tuple, str)):
        a, b = b, a
    if isinstance(node.op, ast.Mult) and isinstance(a, (list, tuple, str)) and isinstance(b, int):
        if len(a) * max(b, 0) > MAX_LIST_ITEMS:
            raise ValueError(f"{where}: a list of {len(a) * b:,} items is out of range; allowed: at most "
                             f"{MAX_LIST_ITEMS:,}")
    if isinstance(node.op, ast.Add) and isinstance(a, (list, tuple, str)) and len(a) + len(b) > MAX_LIST_ITEMS:
        raise ValueError(f"{where}: a list of {len(a) + len(b):,} items is out of range; allowed: at most "
                         f"{MAX_LIST_ITEMS:,}")
    ops = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
           ast.Div: lambda x, y: x / y}
    return ops[type(node.op)](a, b)


def read_evd_cfg(text: str) -> dict[str, dict[str, Any]]:
    """An Efficient-VDVAE .cfg file -> {section: {key: value}}."""
    sections: dict[str, dict[str, Any]] = {}
    current = None
    pending = ""
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.strip().startswith("#"):
            continue
        line = raw.split("#", 1)[0].rstrip() if "'" not in raw and '"' not in raw else raw.rstrip()
        if not line.strip():
            continue
        m = re.match(r"^\[(\w+)\]\s*$", line.strip())
        if m and not pending:
            current = sections.setdefault(m.group(1), {})
            continue
        pending = f"{pending} {line.strip()}" if pending else line.strip()
        if pending.count("[") > pending.count("]") or pending.count("(") > pending.count(")"):
            continue  # a value that continues on the next line
        if "=" not in pending or current is None:
            raise ValueError(f"line {n}: {raw.strip()!r} is neither [section] nor key = value inside a section")
        key, value = pending.split("=", 1)
        current[key.strip()] = literal(value, f"line {n} ({key.strip()})")
        pending = ""
    return sections


def _whole(value: Any, key: str) -> int:
    if float(value) != int(float(value)):
        raise ValueError(f"{key}={value!r} is out of range; allowed: a whole number of steps")
    return int(float(value))


def _no_counterpart(key: str, value: Any, allowed: str, why: str = "") -> ValueError:
    return ValueError(f"{key}={value!r} has no counterpart here{why}; allowed: {allowed}")


def evd_training_config(hp: dict) -> dict[str, dict[str, Any]]:
    """Our `optim` and `loss` tables from Efficient-VDVAE hyperparameters: what its train.py
    does with them (`loss.use_weight_decay` / `l2_weight` are used by its JAX code only: the
    PyTorch optimizer gets weight decay 0). An option we do not implement is refused by name."""
    o, loss, train = hp.get("optimizer", {}), hp.get("loss", {}), hp.get("train", {})
    if o.get("type", "Adamax") != "Adamax":
        raise _no_counterpart("optimizer.type", o["type"], "Adamax (every official configuration)")
    if o.get("learning_rate_scheme", "cosine") != "cosine":
        raise _no_counterpart("optimizer.learning_rate_scheme", o["learning_rate_scheme"], "cosine",
                              " (the official constant and noam schemes fail on current torch, exponential "
                              "computes an XOR)")
    optim: dict[str, Any] = {
        "name": "adamax", "lr_schedule": "efficient-vdvae", "weight_decay": 0.0,
        "lr": float(o["learning_rate"]), "warmup_steps": _whole(o["warmup_steps"], "optimizer.warmup_steps"),
        "decay_start": _whole(o["decay_start"], "optimizer.decay_start"),
        "decay_steps": _whole(o["decay_steps"], "optimizer.decay_steps"),
        "min_lr": float(o["min_learning_rate"]), "betas": [float(o["beta1"]), float(o["beta2"])],
        "eps": float(o["epsilon"]),
        "clip_norm": float(o["gradient_clip_norm_value"]) if o.get("clip_gradient_norm") else 0.0,
        "gradient_skip": bool(o.get("gradient_skip", True)),
        "skip_threshold": float(o.get("gradient_skip_threshold", 0.0)),
    }
    if optim["warmup_steps"] > optim["decay_start"]:
        raise ValueError(f"optimizer.warmup_steps={optim['warmup_steps']} is out of range; allowed: <= "
                         f"optimizer.decay_start={optim['decay_start']} (the official NarrowCosineDecay asserts it)")
    if "ema_decay" in train:
        optim["ema_decay"] = float(train["ema_decay"])
    if "batch_size" in train:
        optim["batch_size"] = int(train["batch_size"])  # global: the official loss divides by the per-GPU share
    if "total_train_steps" in train:
        optim["total_steps"] = int(train["total_train_steps"])
    ours: dict[str, Any] = {}
    schedule = loss.get("variation_schedule", "Linear")
    if schedule == "Linear":
        ours.update(kl_schedule="efficient-vdvae-linear", kl_warmup_start=int(loss["vae_beta_anneal_start"]),
                    kl_warmup_steps=int(loss["vae_beta_anneal_steps"]), kl_beta_min=float(loss["vae_beta_min"]))
    elif schedule == "None":
        ours["kl_schedule"] = "none"
    else:
        raise _no_counterpart("loss.variation_schedule", schedule, "Linear | None",
                              " (the official Logistic schedule fails on an integer step)")
    if loss.get("use_gamma_schedule", True):
        if not loss.get("scaled_gamma", True):
            raise _no_counterpart("loss.scaled_gamma", False, "True (every official configuration)")
        ours.update(kl_balance="efficient-vdvae-gamma", kl_balance_steps=int(loss["gamma_max_steps"]))
    else:
        ours["kl_balance"] = "off"
    return {"optim": optim, "loss": ours}


def vdvae_training_config(H: dict) -> dict[str, dict[str, Any]]:
    """Our `optim` and `loss` tables from openai/vdvae hyperparameters: AdamW (apex FusedAdam
    in AdamW mode, weight decay on every parameter), linear warm-up then constant, clipping
    always, the EMA rate as float32, the plain ELBO (no KL weight, no balancing)."""
    skip = float(H.get("skip_threshold", -1))
    optim: dict[str, Any] = {
        "name": "adamw", "lr_schedule": "vdvae", "lr": float(H["lr"]), "weight_decay": float(H.get("wd", 0.0)),
        "betas": [float(H.get("adam_beta1", 0.9)), float(H.get("adam_beta2", 0.9))],
        "eps": float(H.get("adam_eps", 1e-8)),
        "warmup_steps": _whole(H.get("warmup_iters", 0), "warmup_iters"),
        "clip_norm": float(H.get("grad_clip", 0.0)),
        # -1 turns the norm test off; a NaN loss still skips (our 0: only non-finite)
        "skip_threshold": skip if skip > 0 else 0.0, "gradient_skip": True,
        "ema_decay": float(H.get("ema_rate", 0.9999)), "ema_decay_float32": True,
    }
    if "n_batch" in H:
        optim["batch_size"] = int(H["n_batch"]) * int(H.get("mpi_size", 1))
    return {"optim": optim, "loss": {"kl_schedule": "none", "kl_balance": "off"}}
