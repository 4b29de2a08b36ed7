"""The network's layout: which cells, skips, pools and latent blocks run, in which order.

One grammar holds the layouts of both official implementations exactly. Each path is a
comma-separated string of tokens `<resolution><letter><count>`:

encoder (bottom-up, from the image resolution down):
  `RxN`  N residual cells at R px that send no skip
  `RsN`  N residual cells at R px, each sending its output across as one skip
  `RpK`  downsample by K (R px -> R/K px)
decoder (top-down, from the lowest resolution up); every block holds one latent group:
  `RsN`  N blocks at R px, each reading its own skip
  `RxN`  N blocks at R px that all read one skip
  `RuK`  upsample by K into R px (R/K px -> R px)

Skips pair up per resolution in mirror order: the first decoder entry at R reads the last
skip sent at R, the next one the skip before it, and so on, so every resolution needs as
many decoder entries (an `s` block, or one `x` run) as encoder skips.

Efficient-VDVAE's per-entry lists translate one to one: bottom-up entry i is
`up_n_blocks_per_res[i]` x-cells, one s-cell, then a pool if `up_strides[i]` > 1;
top-down entry i is an unpool if `down_strides[i]` > 1, then one block (`s`) or, with
`down_n_blocks_per_res[i]` followers, one `x` run of 1 + followers blocks. VDVAE's
`32x11,32d2` means 10 x-cells, one s-cell (its skip is the last output at 32 px), one
x-cell and a pool; its decoder `4m1,4x2` is `4u4,4x3`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^(\d+)([a-z])(\d+)$")
ENCODER_KINDS = {"x": "cell", "s": "skip", "p": "pool"}
DECODER_KINDS = {"s": "entry", "x": "run", "u": "unpool"}


@dataclass(frozen=True)
class EncoderUnit:
    kind: str  # "cell" | "skip" (a cell whose output is a skip) | "pool"
    res: int  # resolution the unit reads
    factor: int = 1  # pool: downsampling factor


@dataclass(frozen=True)
class DecoderUnit:
    kind: str  # "block" | "unpool"
    res: int  # resolution the unit writes
    factor: int = 1  # unpool: upsampling factor
    skip: int = -1  # block: index of the skip it reads, in the order the encoder sends them
    entry: int = -1  # block: index of its entry (blocks of one `x` run share it)


@dataclass(frozen=True)
class Layout:
    encoder: tuple[EncoderUnit, ...]
    decoder: tuple[DecoderUnit, ...]

    @property
    def blocks(self) -> list[DecoderUnit]:
        return [u for u in self.decoder if u.kind == "block"]

    @property
    def num_groups(self) -> int:
        return len(self.blocks)

    @property
    def num_cells(self) -> int:
        return sum(u.kind != "pool" for u in self.encoder)

    @property
    def resolutions(self) -> list[int]:
        """Every resolution the network runs at, highest first."""
        return sorted({u.res for u in self.encoder} | {u.res for u in self.decoder}, reverse=True)

    @property
    def lowest(self) -> int:
        return self.decoder[0].res


def _tokens(text: str, key: str, letters: dict[str, str]):
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ValueError(f"{key}={text!r} is empty; allowed: comma-separated tokens like "
                         f"{', '.join('R' + k + 'N' for k in letters)}")
    for i, tok in enumerate(tokens):
        m = _TOKEN.match(tok)
        if not m or m.group(2) not in letters:
            raise ValueError(f"{key} token {i + 1} {tok!r} is not understood; allowed: <resolution><letter><count> "
                             f"with letter {' | '.join(f'{k} ({v})' for k, v in letters.items())}")
        res, count = int(m.group(1)), int(m.group(3))
        if res < 1 or count < 1:
            raise ValueError(f"{key} token {i + 1} {tok!r}: resolution and count must be >= 1")
        yield i, tok, res, m.group(2), count


def parse(encoder: str, decoder: str, resolution: int,
          enc_key: str = "model.encoder", dec_key: str = "model.decoder") -> Layout:
    """Both strings -> a validated Layout; errors name the token and say why."""
    enc: list[EncoderUnit] = []
    res = resolution
    for i, tok, r, letter, n in _tokens(encoder, enc_key, ENCODER_KINDS):
        if r != res:
            raise ValueError(f"{enc_key} token {i + 1} {tok!r} runs at {r} px, but the state is at {res} px there"
                             f" (the encoder starts at model.resolution={resolution} and only 'p' tokens change it)")
        if letter == "p":
            if n < 2 or r % n:
                raise ValueError(f"{enc_key} token {i + 1} {tok!r}: the pool factor must be >= 2 and divide {r}")
            enc.append(EncoderUnit("pool", r, n))
            res = r // n
        else:
            enc.extend(EncoderUnit(ENCODER_KINDS[letter], r) for _ in range(n))
    last_skip = max((j for j, u in enumerate(enc) if u.kind == "skip"), default=-1)
    if last_skip < 0:
        raise ValueError(f"{enc_key}={encoder!r} sends no skip; allowed: at least one 's' token")
    if last_skip != len(enc) - 1:
        raise ValueError(f"{enc_key}={encoder!r} ends in cells or pools after its last skip, which nothing reads;"
                         " allowed: the encoder ends with an 's' token")

    dec: list[DecoderUnit] = []
    res, entries, first = enc[-1].res, 0, True
    for i, tok, r, letter, n in _tokens(decoder, dec_key, DECODER_KINDS):
        if letter == "u":
            if first:
                raise ValueError(f"{dec_key} token {i + 1} {tok!r}: the decoder starts at the encoder's lowest "
                                 f"resolution ({res} px) and cannot begin with an upsampling")
            if n < 2 or r != res * n:
                raise ValueError(f"{dec_key} token {i + 1} {tok!r}: upsampling {res} px by {n} gives {res * n} px, "
                                 f"not {r} px")
            dec.append(DecoderUnit("unpool", r, n))
            res = r
            continue
        if r != res:
            raise ValueError(f"{dec_key} token {i + 1} {tok!r} runs at {r} px, but the state is at {res} px there"
                             f" (the decoder starts at the encoder's lowest resolution and only 'u' tokens change it)")
        first = False
        if letter == "s":
            for _ in range(n):
                dec.append(DecoderUnit("block", r, entry=entries))
                entries += 1
        else:
            dec.extend(DecoderUnit("block", r, entry=entries) for _ in range(n))
            entries += 1
    if res != resolution:
        raise ValueError(f"{dec_key}={decoder!r} ends at {res} px; allowed: a decoder that ends at "
                         f"model.resolution={resolution} px")
    return Layout(tuple(enc), tuple(_pair_skips(enc, dec, enc_key, dec_key)))


def _pair_skips(enc: list[EncoderUnit], dec: list[DecoderUnit], enc_key: str, dec_key: str) -> list[DecoderUnit]:
    skips_at: dict[int, list[int]] = {}
    for u in enc:
        if u.kind == "skip":
            skips_at.setdefault(u.res, []).append(sum(len(v) for v in skips_at.values()))
    entries_at: dict[int, list[int]] = {}
    for u in dec:
        if u.kind == "block" and u.entry not in entries_at.get(u.res, []):
            entries_at.setdefault(u.res, []).append(u.entry)
    for r in sorted(set(skips_at) | set(entries_at), reverse=True):
        n_skip, n_entry = len(skips_at.get(r, [])), len(entries_at.get(r, []))
        if n_skip != n_entry:
            raise ValueError(f"{enc_key} sends {n_skip} skip(s) at {r} px but {dec_key} has {n_entry} entr"
                             f"{'y' if n_entry == 1 else 'ies'} there; allowed: equal counts per resolution "
                             "(decoder entries read the skips in mirror order)")
    skip_of = {}
    for r, entries in entries_at.items():
        for k, e in enumerate(entries):
            skip_of[e] = skips_at[r][-1 - k]
    return [DecoderUnit(u.kind, u.res, u.factor, skip_of[u.entry], u.entry) if u.kind == "block" else u for u in dec]


def format_encoder(units) -> str:
    out: list[list] = []
    for u in units:
        letter = {"cell": "x", "skip": "s", "pool": "p"}[u.kind]
        if letter != "p" and out and out[-1][:2] == [u.res, letter]:
            out[-1][2] += 1
        else:
            out.append([u.res, letter, u.factor if letter == "p" else 1])
    return ",".join(f"{r}{ch}{n}" for r, ch, n in out)


def format_decoder(units) -> str:
    """Inverse of the decoder half of `parse` (entries as written by the official lists)."""
    units = list(units)
    out: list[list] = []
    runs: dict[int, int] = {}
    for u in units:
        if u.kind == "block":
            runs[u.entry] = runs.get(u.entry, 0) + 1
    seen = set()
    for u in units:
        if u.kind == "unpool":
            out.append([u.res, "u", u.factor])
        elif u.entry not in seen:
            seen.add(u.entry)
            if runs[u.entry] > 1:
                out.append([u.res, "x", runs[u.entry]])
            elif out and out[-1][:2] == [u.res, "s"]:
                out[-1][2] += 1
            else:
                out.append([u.res, "s", 1])
    return ",".join(f"{r}{ch}{n}" for r, ch, n in out)
