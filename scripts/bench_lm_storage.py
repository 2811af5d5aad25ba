"""Benchmark: bytes per token of language-model caches, plain against compact (issue 5).

The goal: bytes per token on disk at vocab 32k and 128k for top-k 16/64/128 (and 50) and sampled
M=50, with the reconstruction's fidelity and the write and read speeds, below the published points
of DistillKit (~300 B/token at k=128, its recommended setting, and ~114 B/token at k=50, vocab 128k)
and RS-KD (~36 B/token, sampled) at equal or better fidelity.

    python scripts/bench_lm_storage.py            # defaults: 16k tokens per vocab and id prior, ~5 min on 2 cores
    python scripts/bench_lm_storage.py --quick    # smoke run, 2k tokens, about a minute

**Logits.** Synthetic but shaped like a language model's next-token distributions:
``logit_i = s * (log pi_i + log V + X_i)`` with ``X_i`` iid Exp(1) noise (an exponential upper tail,
so the sorted probabilities fall off as a power law of the rank, ``p_r ~ r^-s``, as real LMs' do
near the top), ``s`` a per-token sharpness, lognormal (``exp(mu + sigma z)``, defaults 0.55 and 0.35)
so that some tokens are confident and some flat, and ``pi`` a prior over token ids: ``zipf``
(``pi_i ~ 1 / (i + 1)^a``: BPE vocabularies are roughly frequency-sorted, so likely tokens have small
ids, which helps delta coding) or ``uniform`` (the pessimistic case: top ids anywhere). The largest
values of ``log pi_i + X_i`` fall on ids drawn roughly like samples of ``pi``. The statistics this is
tuned to, and printed per run: mean entropy 1.5 to 3 nats, mean top-1 probability 0.4 to 0.6 (real
LMs' ranges), and the mean top-k mass for each K. Generated on the CPU with numpy's seeded generator
in chunks (rows x V float32, ~256 MB), never all at once.

**What runs, per vocab and id prior.** ``logit_cache.targets.encode`` gives the logical arrays of
top-128 (top-16/50/64 are its first columns: ``torch.topk`` is sorted) and of sampled M=50 at Ts=1
(a seeded generator), in float16; ids and counts are narrowed to the format's dtypes as the dump
does, and each top-k carries its ``topk_log_tail`` as the dump writes it (float32, from the float32
logits). For each method and encoding (``plain``, ``compact``; zarr, and HDF5 for plain with the first
id prior, uncompressed as the HDF5 backend stores) one shard is written through
``get_backend(...).create(path, stored_specs(...), chunk_rows, ...)`` with the dump's chunk rule
(``logit_cache.format.chunk_and_shard_rows``), ``--batch-rows`` rows per ``append``, then ``close``.

* **B/token**: the size of every file of the shard (data and metadata) over the tokens.
* **write tok/s**: ``encode_arrays`` + ``append`` + ``close`` (generation, top-k and sampling excluded).
* **read tok/s**: open the shard, read every stored array in chunk-sized blocks, ``decode_arrays``.
  The decoded arrays are checked equal to an in-memory encode/decode.
  Timings are the best of ``--repeats`` (other work on the machine only slows a run down).
* **KL** and **TV**: KL(p || p^) and the total variation between the true distribution ``p`` (the
  softmax of the float32 logits) and the cache's reconstruction ``p^`` over all V ids, per token,
  averaged over the first ``--fidelity-tokens`` tokens. For top-k, ``p^`` is the decoded top-k
  probabilities and the stored tail mass ``topk_log_tail`` spread evenly over the other V - K ids,
  the row total log sum exp(v) - log(1 - tail): the loss's tail model (``targets.topk_log_probs``
  with the tail, recomputed here in float64; without a tail, 1 - the top-k mass from logsumexp,
  checked against it), so a float16 or quantized cache is measured as the loss reads it, its tail
  not lost to the cancellation of 1 - sum p in float32. For sampled, ``counts / M`` is unbiased but puts 0 on every id not drawn, so
  KL(p || counts/M) is infinite; ``p^`` is smoothed like the top-k tail instead: the unseen mass is
  the Good-Turing estimate ``u = n1 / M`` (n1 = ids drawn once; kept in [1/(2M), 1 - 1/(2M)]),
  spread evenly over the ids not drawn, and the drawn ids get ``(1 - u) * counts / M``. The rows'
  logsumexp and sum p log p accumulate in float64 (elementwise exp in float32), gathered
  log-probabilities are float64, the TV's sums over all V ids float32 (pairwise, ~1e-7 relative).
* **dKL T=1, T=2**: the compact encoding's own fidelity loss, KL(p^_plain || p^_compact) between
  the plain and the compact reconstructions at temperature T (top-k; sampled is lossless).

**Ablation** (largest vocab; every stored array compressed here with numcodecs' Blosc exactly as the
Zarr backend does, one chunk at a time): bytes at zstd levels ``--clevels`` (the store uses level
1; this shows what a higher level would buy), top-k value quantizers (float16, 8-bit sqrt(p) codes
with and without the per-row tail mass, 8-bit log-probabilities with a per-row float16 min/max),
sampled layouts (one padded array vs the head/rest split), and the ids against the information
bound of a uniformly random K-subset, log2 C(V, K) bits.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numcodecs import Blosc

from logit_cache.format import chunk_and_shard_rows
from logit_cache.store import get_backend
from logit_cache.store.entropy_codec import make_codec
from logit_cache.targets import LOG_MASS_FLOOR, count_dtype, decode_arrays, encode, encode_arrays, index_dtype, stored_specs, topk_log_probs
from logit_cache.targets.compact import CODE_LEVELS, ZERO_CODE, sampled_head

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dump import machine_info, scratch_dir, table, timed, write_report

METHODS = (("topk", 16), ("topk", 50), ("topk", 64), ("topk", 128), ("sampled", 50))
REFERENCES = [
    {"vocab": 131072, "method": "top-128", "source": "DistillKit (recommended config)", "bytes_per_token": 300},
    {"vocab": 131072, "method": "top-50", "source": "DistillKit (budget config)", "bytes_per_token": 114},
    {"vocab": None, "method": "sampled", "source": "RS-KD", "bytes_per_token": 36},
]
GOALS = {("topk", 128): 300, ("topk", 50): 114, ("sampled", 50): 36}
#: Issue 15's goals for the entropy encoding at vocab 131,072: (Zipf ids, uniform ids) B/token.
ENTROPY_GOALS = {("topk", 128): (180, 240), ("topk", 50): (85, 110), ("sampled", 50): (30, 34)}
#: Encodings compared (zarr).
ENCODINGS = ("plain", "compact", "entropy")


def method_name(mode: str, width: int) -> str:
    return f"top-{width}" if mode == "topk" else f"sampled M={width}"


# --------------------------------------------------------------------------------------------------
# Synthetic LM logits
# --------------------------------------------------------------------------------------------------


def id_log_prior(num_classes: int, prior: str, exponent: float) -> torch.Tensor:
    """``log pi_i + log V``: 0 for every id under the uniform prior; Zipf favours small ids."""
    if prior == "uniform":
        return torch.zeros(num_classes)
    log_pi = -exponent * torch.log1p(torch.arange(num_classes, dtype=torch.float64))
    return (log_pi - torch.logsumexp(log_pi, 0) + math.log(num_classes)).float()


def generate(rng: np.random.Generator, rows: int, log_prior: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """``rows`` tokens of logits [rows, V] float32 (see the module docstring)."""
    noise = torch.from_numpy(rng.standard_exponential((rows, len(log_prior)), dtype=np.float32))
    sharpness = torch.from_numpy(np.exp(mu + sigma * rng.standard_normal((rows, 1))).astype(np.float32))
    return noise.add_(log_prior).mul_(sharpness)


def logical_arrays(raw: torch.Tensor, dtype: str, generator: torch.Generator) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """The logical arrays of every method for these rows, in the format's dtypes."""
    num_classes = raw.shape[1]
    kmax = max(width for mode, width in METHODS if mode == "topk")
    top = {name: t.numpy() for name, t in encode(raw, "topk", kmax, dtype).arrays.items()}
    top["topk_indices"] = top["topk_indices"].astype(index_dtype(num_classes))
    # each K's tail log-mass as the dump writes it (topk_log_tail: from the float32 logits, float64 sums)
    wide = torch.topk(raw, kmax, dim=1).values.double().numpy() - top["logsumexp"].astype(np.float64)[:, None]
    tail = np.exp(top["topk_log_tail"].astype(np.float64))[:, None] + np.cumsum(np.exp(wide[:, ::-1]), axis=1)[:, ::-1]
    out = {}
    for mode, width in METHODS:
        if mode == "topk":  # torch.topk is sorted: the top-k of K < kmax are the first K columns
            log_tail = top["topk_log_tail"] if width == kmax else np.log(tail[:, width]).astype(np.float32)
            out[mode, width] = {"topk_logits": np.ascontiguousarray(top["topk_logits"][:, :width]),
                                "topk_indices": np.ascontiguousarray(top["topk_indices"][:, :width]),
                                "logsumexp": top["logsumexp"], "topk_log_tail": log_tail}
        else:
            sampled = {name: t.numpy() for name, t in encode(raw, "sampled", None, dtype, m=width, generator=generator).arrays.items()}
            sampled["sampled_indices"] = sampled["sampled_indices"].astype(index_dtype(num_classes))
            sampled["sampled_counts"] = sampled["sampled_counts"].astype(count_dtype(width))
            out[mode, width] = sampled
    return out


# --------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


def tail_model(values: np.ndarray, logsumexp: np.ndarray, temperature: float, num_classes: int,
               log_tail: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``targets.topk_log_probs`` in float64 (numpy): log-probabilities of the top-k at T, and of the whole tail.
    With ``log_tail`` (the cache's ``topk_log_tail``) the tail is that one and the row total follows from it,
    as the loss does; without, the tail is 1 - the top-k mass from ``logsumexp`` (older caches)."""
    v = values.astype(np.float64)
    log_count = math.log(num_classes - v.shape[1])
    with np.errstate(divide="ignore"):
        if log_tail is None:
            lse = logsumexp.astype(np.float64)
            log_top = np.minimum(_logsumexp(v - lse[:, None]), 0.0)
            log_tail = np.maximum(np.log(-np.expm1(log_top)), LOG_MASS_FLOOR)
        else:
            log_tail = np.clip(log_tail.astype(np.float64), LOG_MASS_FLOOR, 0.0)
            lse = _logsumexp(v) - np.maximum(np.log(-np.expm1(log_tail)), LOG_MASS_FLOOR)
    scaled = v / temperature
    log_tail_t = log_count + (lse + log_tail - log_count) / temperature
    log_z = np.logaddexp(_logsumexp(scaled), log_tail_t)
    return scaled - log_z[:, None], log_tail_t - log_z


def row_moments(raw: torch.Tensor, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per row of softmax(raw / T): logsumexp of raw / T (float64), sum p log p (float64), and p
    (float32), from one exp pass."""
    scaled = raw / temperature if temperature != 1.0 else raw
    top = scaled.max(dim=1, keepdim=True).values
    weights = torch.exp(scaled - top)
    total = weights.sum(dim=1, dtype=torch.float64)
    mean_logit = (weights * scaled).sum(dim=1, dtype=torch.float64) / total
    lse = top.squeeze(1).double() + torch.log(total)
    probs = weights.div_(total.float()[:, None])
    return lse.numpy(), (mean_logit - lse).numpy(), probs


def _gather_log_probs(raw: torch.Tensor, ids: np.ndarray, lse: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return raw.gather(1, torch.from_numpy(ids.astype(np.int64))).double().numpy() / temperature - lse[:, None]


def _abs_sum(probs: torch.Tensor, level: np.ndarray) -> np.ndarray:
    """sum_i |p_i - level| over each full row (the tail part of a total variation), in float32:
    torch sums pairwise, so the error stays ~1e-7 of the result, and a float64 sum over [rows, V]
    would cost 3x as long (this runs once per method and encoding)."""
    difference = torch.sub(probs, torch.from_numpy(level).float()[:, None])
    return difference.abs_().sum(dim=1).double().numpy()


def topk_fidelity(raw: torch.Tensor, moments: tuple, arrays: dict[str, np.ndarray], temperature: float = 1.0,
                  with_tv: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """KL(p_T || p^_T) and TV(p_T, p^_T) per row, p^ = decoded top-k + the tail spread evenly (the
    loss's tail model at T), p_T = softmax(raw / T); ``moments`` = row_moments(raw, T)."""
    lse, neg_entropy, probs = moments
    num_classes, k = raw.shape[1], arrays["topk_indices"].shape[1]
    log_p = _gather_log_probs(raw, arrays["topk_indices"], lse, temperature)
    p = np.exp(log_p)
    log_q, log_tail = tail_model(arrays["topk_logits"], arrays["logsumexp"], temperature, num_classes, arrays.get("topk_log_tail"))
    log_each = log_tail - math.log(num_classes - k)  # every tail id's log-probability in p^
    tail_mass = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    kl = (p * (log_p - log_q)).sum(axis=1) + (neg_entropy - (p * log_p).sum(axis=1)) - tail_mass * log_each
    if not with_tv:
        return kl, None
    level = np.exp(log_each)
    tv = 0.5 * (np.abs(p - np.exp(log_q)).sum(axis=1) + _abs_sum(probs, level) - np.abs(p - level[:, None]).sum(axis=1))
    return kl, tv


def sampled_fidelity(raw: torch.Tensor, moments: tuple, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """KL(p || p^) and TV(p, p^) per row, p^ = Good-Turing-smoothed counts / M (module docstring)."""
    lse, neg_entropy, probs = moments
    num_classes = raw.shape[1]
    counts = arrays["sampled_counts"].astype(np.float64)
    m = counts.shape[1]
    valid = counts > 0
    log_p = np.where(valid, _gather_log_probs(raw, arrays["sampled_indices"], lse), 0.0)
    p = np.where(valid, np.exp(log_p), 0.0)
    unseen = np.clip(np.maximum((counts == 1).sum(axis=1), 0.5) / m, 0.5 / m, 1 - 0.5 / m)
    q = (1 - unseen)[:, None] * counts / m
    level = unseen / (num_classes - valid.sum(axis=1))
    with np.errstate(divide="ignore"):
        log_q = np.where(valid, np.log(q), 0.0)
    kl = (p * (log_p - log_q)).sum(axis=1) + (neg_entropy - (p * log_p).sum(axis=1)) - (1 - p.sum(axis=1)) * np.log(level)
    drawn_to_level = np.where(valid, np.abs(p - level[:, None]), 0.0).sum(axis=1)
    tv = 0.5 * (np.abs(p - q).sum(axis=1) + _abs_sum(probs, level) - drawn_to_level)
    return kl, tv


def fidelity_means(fidelity: dict[tuple, list[np.ndarray]], key: tuple) -> dict[str, float | None]:
    """Mean of each fidelity measure collected under ``key`` (None where it does not apply)."""
    names = ("kl", "tv", "kl_t2", "dkl_t1", "dkl_t2")
    return {name: float(np.concatenate(fidelity[(*key, name)]).mean()) if (*key, name) in fidelity else None for name in names}


def _by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)


def reconstruction_kl(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], temperature: float, num_classes: int) -> np.ndarray:
    """KL(p^_reference || p^_other) per row at ``temperature``: two top-k reconstructions of the same ids."""
    ids_a, values_a = _by_id(reference["topk_indices"], reference["topk_logits"])
    ids_b, values_b = _by_id(other["topk_indices"], other["topk_logits"])
    if not np.array_equal(ids_a, ids_b):
        raise RuntimeError("the two reconstructions hold different ids")
    log_a, tail_a = tail_model(values_a, reference["logsumexp"], temperature, num_classes, reference.get("topk_log_tail"))
    log_b, tail_b = tail_model(values_b, other["logsumexp"], temperature, num_classes, other.get("topk_log_tail"))
    return (np.exp(log_a) * (log_a - log_b)).sum(axis=1) + np.exp(tail_a) * (tail_a - tail_b)


# --------------------------------------------------------------------------------------------------
# Writing and reading shards
# --------------------------------------------------------------------------------------------------


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def specs_for(mode: str, width: int, num_classes: int, dtype: str, encoding: str, rows: int) -> tuple[list, int]:
    specs = stored_specs(mode, width, num_classes, dtype, encoding)
    chunk_rows, _ = chunk_and_shard_rows(specs, None, 1, rows)
    return specs, chunk_rows


def coded_roundtrip(mode: str, logical: dict[str, np.ndarray], encoding: str, num_classes: int, dtype: str) -> dict[str, np.ndarray]:
    """encode_arrays, the entropy codecs' chunk coding (one chunk: rows code alike in any chunking), decode_arrays."""
    stored = encode_arrays(mode, logical, encoding, num_classes)
    if encoding == "entropy":
        width = next(iter(stored.values())).shape[1]
        for spec in stored_specs(mode, width, num_classes, dtype, encoding, "sampled_logits" in logical):
            if spec.codec:
                codec = make_codec(spec.codec, spec.codec_config)
                stored[spec.name] = codec._decode_array(codec._encode_array(stored[spec.name])).astype(spec.dtype)
    return decode_arrays(mode, stored, encoding, num_classes, dtype)


def write_shard(path: Path, backend: str, mode: str, width: int, num_classes: int, dtype: str, encoding: str,
                logical: dict[str, np.ndarray], batch_rows: int) -> None:
    rows = len(logical["logsumexp"])
    specs, chunk_rows = specs_for(mode, width, num_classes, dtype, encoding, rows)
    writer = get_backend(backend).create(path, specs, chunk_rows, {"encoding": encoding}, {spec.name: rows for spec in specs})
    for start in range(0, rows, batch_rows):
        writer.append(encode_arrays(mode, {name: a[start:start + batch_rows] for name, a in logical.items()}, encoding, num_classes))
    writer.close()


def read_shard(path: Path, backend: str, mode: str, num_classes: int, dtype: str, encoding: str) -> list[dict[str, np.ndarray]]:
    parts = []
    with get_backend(backend).open(path) as reader:
        names = reader.names()
        rows, step = reader.shape(names[0])[0], reader.chunk_rows(names[0])
        for start in range(0, rows, step):
            stored = {name: reader.read(name, start, min(rows, start + step)) for name in names}
            parts.append(decode_arrays(mode, stored, encoding, num_classes, dtype))
    return parts


# --------------------------------------------------------------------------------------------------
# Ablation: what other layouts and zstd levels would store
# --------------------------------------------------------------------------------------------------


def blosc_bytes(array: np.ndarray, chunk_rows: int, clevel: int) -> int:
    """Compressed bytes of ``array`` cut in chunks of ``chunk_rows`` rows, as the Zarr backend stores it."""
    codec = Blosc(cname="zstd", clevel=clevel, shuffle=Blosc.BITSHUFFLE, blocksize=0, typesize=array.dtype.itemsize)
    return sum(len(codec.encode(np.ascontiguousarray(array[s:s + chunk_rows]))) for s in range(0, len(array), chunk_rows))


def rice_bytes(gaps: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Mean bytes per row of the gaps Golomb-Rice coded with each row's best parameter (plus 5 bits
    to name it): what a bit-packed layout could reach before any container overhead (not stored)."""
    gaps = gaps.astype(np.int64)
    mask = np.ones(gaps.shape, bool) if valid is None else valid
    best = np.full(len(gaps), np.inf)
    for k in range(25):
        best = np.minimum(best, np.where(mask, (gaps >> k) + 1 + k, 0).sum(axis=1))
    return float((best + 5).mean() / 8)


def _quantizer_variants(logical: dict[str, np.ndarray], num_classes: int) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Value quantizers for top-k rows in ascending-id order: name -> (arrays they store, decoded rows)."""
    ids, values = _by_id(logical["topk_indices"], logical["topk_logits"])
    lse = logical["logsumexp"].astype(np.float64)
    log_p = np.minimum(values.astype(np.float64) - lse[:, None], 0.0)
    compact = encode_arrays("topk", logical, "compact", num_classes)
    log_tail = compact["topk_log_tail"]
    log_top = np.log(np.maximum(-np.expm1(log_tail.astype(np.float64)), 1e-300))

    def rows(log_q: np.ndarray, renormalize: bool) -> dict[str, np.ndarray]:
        shift = log_top - _logsumexp(log_q) if renormalize else 0.0
        return {"topk_indices": ids, "topk_logits": (log_q + (shift + lse)[:, None]).astype(np.float32), "logsumexp": logical["logsumexp"]}

    codes = compact["topk_codes"]
    sqrt_log_q = 2 * np.log(np.maximum(codes.astype(np.float64), ZERO_CODE) / CODE_LEVELS)
    low = log_p.min(axis=1).astype(np.float16)
    high = log_p.max(axis=1).astype(np.float16)
    step = np.maximum((high.astype(np.float64) - low) / 255, 1e-12)
    log_codes = np.clip(np.rint((log_p - low[:, None]) / step[:, None]), 0, 255).astype(np.uint8)
    return {
        "float16 logits (plain)": ({"topk_logits": values},
                                   {"topk_indices": ids, "topk_logits": values, "logsumexp": logical["logsumexp"]}),
        "8-bit sqrt(p) + tail log-mass (compact)": ({"topk_codes": codes, "topk_log_tail": log_tail}, rows(sqrt_log_q, True)),
        "8-bit sqrt(p), no tail mass": ({"topk_codes": codes}, rows(sqrt_log_q, False)),
        "8-bit log p, row min/max + tail log-mass": (
            {"codes": log_codes, "min_max": np.stack([low, high], axis=1), "topk_log_tail": log_tail},
            rows(low[:, None] + log_codes * step[:, None], True)),
    }


def ablation(collected: dict, num_classes: int, dtype: str, clevels: list[int], fidelity_rows: int) -> dict[str, Any]:
    tokens = len(collected[METHODS[0]]["logsumexp"])
    out: dict[str, Any] = {"clevels": [], "quantizers": [], "sampled_layouts": [], "ids": []}
    for mode, width in METHODS:
        logical = collected[mode, width]
        for encoding in ("plain", "compact"):
            specs, chunk_rows = specs_for(mode, width, num_classes, dtype, encoding, tokens)
            stored = encode_arrays(mode, logical, encoding, num_classes)
            sizes = {level: sum(blosc_bytes(stored[spec.name], chunk_rows, level) for spec in specs if spec.name in stored) / tokens
                     for level in clevels}
            out["clevels"].append({"method": method_name(mode, width), "encoding": encoding, "bytes_per_token": sizes})
        chunk_rows = specs_for(mode, width, num_classes, dtype, "compact", tokens)[1]
        if mode == "topk" and width in (50, 128):
            variants = _quantizer_variants(logical, num_classes)
            head = _quantizer_variants({name: a[:fidelity_rows] for name, a in logical.items()}, num_classes)
            reference = head["float16 logits (plain)"][1]
            for name, (stored, _) in variants.items():
                decoded = head[name][1]
                out["quantizers"].append({
                    "method": method_name(mode, width), "quantizer": name,
                    "value_bytes_per_token": sum(blosc_bytes(a, chunk_rows, 1) for a in stored.values()) / tokens,
                    "dkl_t1": float(reconstruction_kl(reference, decoded, 1.0, num_classes).mean()),
                    "dkl_t2": float(reconstruction_kl(reference, decoded, 2.0, num_classes).mean()),
                })
        if mode == "topk":
            gaps = encode_arrays(mode, logical, "compact", num_classes)["topk_id_gaps"]
            bound = (math.lgamma(num_classes + 1) - math.lgamma(width + 1) - math.lgamma(num_classes - width + 1)) / math.log(2) / 8
            out["ids"].append({"method": method_name(mode, width),
                               "plain_ids": blosc_bytes(logical["topk_indices"], chunk_rows, 1) / tokens,
                               "gaps": blosc_bytes(gaps, chunk_rows, 1) / tokens, "rice": rice_bytes(gaps), "uniform_subset_bound": bound})
        else:
            stored = encode_arrays(mode, logical, "compact", num_classes)
            gaps = [stored[name] for name in ("sampled_id_gaps_head", "sampled_id_gaps_rest") if name in stored]
            whole = {"gaps": np.concatenate(gaps, axis=1), "counts": logical["sampled_counts"]}
            for label, arrays in (("plain ids + counts", {n: logical[n] for n in ("sampled_indices", "sampled_counts")}),
                                  ("gaps + counts, one padded [M] array each", whole),
                                  (f"gaps + counts split at {sampled_head(width)} columns (compact)",
                                   {n: a for n, a in stored.items() if n != "logsumexp"})):
                out["sampled_layouts"].append({"method": method_name(mode, width), "layout": label,
                                               "bytes_per_token": sum(blosc_bytes(a, chunk_rows, 1) for a in arrays.values()) / tokens})
            counts = logical["sampled_counts"].astype(np.int64)
            valid = counts > 0
            gamma = np.where(valid, 2 * np.floor(np.log2(np.maximum(counts, 1))) + 1, 0).sum(axis=1).mean() / 8
            out["sampled_layouts"].append({"method": method_name(mode, width), "bytes_per_token": rice_bytes(whole["gaps"], valid) + gamma,
                                           "layout": "Rice-coded gaps + Elias-gamma counts (bit count only, not a stored layout)"})
    return out


# --------------------------------------------------------------------------------------------------
# One vocabulary and id prior
# --------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: Path, num_classes: int, prior: str, with_hdf5: bool) -> dict[str, Any]:
    rng = np.random.default_rng([args.seed, num_classes, 0 if prior == "zipf" else 1])
    sampler = torch.Generator().manual_seed(args.seed)
    log_prior = id_log_prior(num_classes, prior, args.zipf_exponent)
    chunk = max(256, (1 << 26) // num_classes)  # rows per generated block: 256 MB of float32 logits
    parts: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {method: [] for method in METHODS}
    fidelity: dict[tuple, list[np.ndarray]] = {}
    stats: dict[str, list[np.ndarray]] = {}
    gen_seconds = 0.0
    phase_started = time.perf_counter()
    for start in range(0, args.tokens, chunk):
        started = time.perf_counter()
        raw = generate(rng, min(chunk, args.tokens - start), log_prior, args.sharpness_mu, args.sharpness_sigma)
        logical = logical_arrays(raw, args.dtype, sampler)
        gen_seconds += time.perf_counter() - started
        for method, arrays in logical.items():
            parts[method].append(arrays)
        if start >= args.fidelity_tokens:
            continue
        rows = min(len(raw), args.fidelity_tokens - start)
        raw = raw[:rows]
        moments = row_moments(raw)
        moments_t2 = row_moments(raw, 2.0)
        stats.setdefault("entropy", []).append(-moments[1])
        top = logical["topk", 128]
        top_p = np.exp(_gather_log_probs(raw, top["topk_indices"][:rows], moments[0]))
        stats.setdefault("top1", []).append(top_p[:, 0])
        for mode, width in METHODS:
            arrays = {name: a[:rows] for name, a in logical[mode, width].items()}
            if mode == "topk":
                stats.setdefault(f"mass_top{width}", []).append(top_p[:, :width].sum(axis=1))
                if start == 0:  # the float64 tail model is the loss's (checked on T=1, where both are exact)
                    ours = tail_model(arrays["topk_logits"], arrays["logsumexp"], 1.0, num_classes)[0]
                    values, lse = torch.from_numpy(arrays["topk_logits"]), torch.from_numpy(arrays["logsumexp"])
                    if np.abs(ours - topk_log_probs(values, lse, 1.0, num_classes)[0].numpy()).max() > 1e-3:
                        raise RuntimeError("the float64 tail model disagrees with targets.topk_log_probs")
            else:
                stats.setdefault(f"distinct_m{width}", []).append((arrays["sampled_counts"] > 0).sum(axis=1).astype(np.float64))
            variants = [(encoding, args.dtype, arrays) for encoding in ENCODINGS]
            if mode == "topk" and num_classes == max(args.vocabs):
                # the same top-k with float32 values: plain float32, and compact fed and decoded as float32
                exact = {**arrays, "topk_logits": raw.gather(1, torch.from_numpy(arrays["topk_indices"].astype(np.int64))).numpy()}
                variants += [(encoding, "float32", exact) for encoding in ENCODINGS if args.dtype != "float32"]
            for encoding, dtype, given in variants:
                decoded = coded_roundtrip(mode, given, encoding, num_classes, dtype)
                key = (mode, width, encoding, dtype)
                kl, tv = (topk_fidelity if mode == "topk" else sampled_fidelity)(raw, moments, decoded)
                fidelity.setdefault((*key, "kl"), []).append(kl)
                fidelity.setdefault((*key, "tv"), []).append(tv)
                if mode == "topk":
                    fidelity.setdefault((*key, "kl_t2"), []).append(topk_fidelity(raw, moments_t2, decoded, 2.0, with_tv=False)[0])
                if mode == "topk" and encoding != "plain":
                    for temperature in (1.0, 2.0):
                        fidelity.setdefault((*key, f"dkl_t{temperature:g}"), []).append(
                            reconstruction_kl(given, decoded, temperature, num_classes))
                elif mode == "sampled" and encoding != "plain":
                    if any(not np.array_equal(decoded[n], arrays[n]) for n in arrays):
                        raise RuntimeError(f"{encoding} sampled rows did not decode to the logical rows")
                    for name in ("dkl_t1", "dkl_t2"):  # lossless
                        fidelity.setdefault((*key, name), []).append(np.zeros(rows))
    collected = {method: {name: np.concatenate([p[name] for p in ps]) for name in ps[0]} for method, ps in parts.items()}
    summary = {name: float(np.concatenate(values).mean()) for name, values in stats.items()}
    print(f"vocab {num_classes}, {prior} ids: {args.tokens} tokens generated and encoded in {gen_seconds:.1f} s; "
          + ", ".join(f"{name} {value:.3f}" for name, value in summary.items()), file=sys.stderr, flush=True)

    phases = {"generate_encode_fidelity_s": time.perf_counter() - phase_started}
    phase_started = time.perf_counter()
    results = []
    for mode, width in METHODS:
        logical = collected[mode, width]
        configs = [(encoding, "zarr") for encoding in ENCODINGS] + ([("plain", "hdf5")] if with_hdf5 else [])
        for encoding, backend in configs:
            expected = coded_roundtrip(mode, logical, encoding, num_classes, args.dtype)
            path = workdir / f"{num_classes}-{prior}-{mode}{width}-{encoding}{get_backend(backend).suffix}"
            writes, reads = [], []
            for _ in range(args.repeats):
                remove(path)
                record: dict[str, Any] = {}
                with timed(record):
                    write_shard(path, backend, mode, width, num_classes, args.dtype, encoding, logical, args.batch_rows)
                writes.append(record)
                record = {}
                with timed(record):
                    decoded_parts = read_shard(path, backend, mode, num_classes, args.dtype, encoding)
                reads.append(record)
                decoded = {name: np.concatenate([p[name] for p in decoded_parts]) for name in expected}
                if any(not np.array_equal(decoded[name], expected[name]) for name in expected):
                    raise RuntimeError(f"{path.name}: the rows read back differ from an in-memory encode/decode")
            size = disk_bytes(path)
            row = {
                "vocab": num_classes, "id_prior": prior, "method": method_name(mode, width), "mode": mode, "width": width,
                "encoding": encoding, "backend": backend, "tokens": args.tokens, "bytes_on_disk": size,
                "bytes_per_token": size / args.tokens,
                "chunk_rows": specs_for(mode, width, num_classes, args.dtype, encoding, args.tokens)[1],
                **fidelity_means(fidelity, (mode, width, encoding, args.dtype)),
                "write_tokens_per_s": args.tokens / min(r["wall_s"] for r in writes),
                "read_tokens_per_s": args.tokens / min(r["wall_s"] for r in reads),
                "writes": writes, "reads": reads,
            }
            results.append(row)
            print(f"  {row['method']:<13} {encoding:<8} {backend:<5} {row['bytes_per_token']:8.1f} B/token  KL {row['kl']:.4f}  "
                  f"write {row['write_tokens_per_s']:,.0f} tok/s  read {row['read_tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)
            if not args.keep:
                remove(path)
    phases["write_read_s"] = time.perf_counter() - phase_started
    out = {"vocab": num_classes, "id_prior": prior, "stats": summary, "generate_and_encode_s": gen_seconds, "phases": phases,
           "rows": results}
    if num_classes == max(args.vocabs) and args.dtype != "float32":
        out["value_dtypes"] = [
            {"method": method_name(mode, width), "encoding": encoding, "dtype": dtype,
             **fidelity_means(fidelity, (mode, width, encoding, dtype))}
            for mode, width in METHODS if mode == "topk" for encoding in ENCODINGS for dtype in (args.dtype, "float32")]
    if num_classes == max(args.vocabs):
        phase_started = time.perf_counter()
        out["ablation"] = ablation(collected, num_classes, args.dtype, args.clevels, min(args.fidelity_tokens, args.tokens))
        phases["ablation_s"] = time.perf_counter() - phase_started
    print(f"vocab {num_classes}, {prior} ids: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), file=sys.stderr, flush=True)
    return out


def per_sample(args: argparse.Namespace, workdir: Path, classes: int = 1000, k: int = 10) -> list[dict[str, Any]]:
    """Per-sample (vision) rows: top-10 of 1,000 classes (uniform ids, the LM logit model), B/row per encoding."""
    rng = np.random.default_rng([args.seed, classes, 2])
    raw = generate(rng, args.tokens, id_log_prior(classes, "uniform", 1.0), args.sharpness_mu, args.sharpness_sigma)
    top = {name: t.numpy() for name, t in encode(raw, "topk", k, "float32").arrays.items()}
    top["topk_indices"] = top["topk_indices"].astype(index_dtype(classes))
    logical = top
    moments = row_moments(raw[: args.fidelity_tokens])
    out = []
    for encoding in ENCODINGS:
        path = workdir / f"per-sample-{encoding}.zarr"
        remove(path)
        record: dict[str, Any] = {}
        with timed(record):
            write_shard(path, "zarr", "topk", k, classes, "float32", encoding, logical, args.batch_rows)
        head = {name: a[: args.fidelity_tokens] for name, a in logical.items()}
        decoded = coded_roundtrip("topk", head, encoding, classes, "float32")
        kl = topk_fidelity(raw[: args.fidelity_tokens], moments, decoded, with_tv=False)[0]
        out.append({"classes": classes, "k": k, "encoding": encoding, "bytes_per_row": disk_bytes(path) / args.tokens,
                    "kl": float(kl.mean()), "dkl_t1": float(reconstruction_kl(head, decoded, 1.0, classes).mean()),
                    "write_rows_per_s": args.tokens / record["wall_s"]})
        print(f"  per-sample top-{k} of {classes} {encoding:<8} {out[-1]['bytes_per_row']:6.1f} B/row", file=sys.stderr, flush=True)
        if not args.keep:
            remove(path)
    return out


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_main(rows: list[dict[str, Any]]) -> str:
    header = ["vocab", "ids", "method", "encoding", "backend", "B/token", "KL", "KL T=2", "TV", "dKL T=1", "dKL T=2",
              "write tok/s", "read tok/s"]
    lines = [[f"{r['vocab']:,}", r["id_prior"], r["method"], r["encoding"], r["backend"], f"{r['bytes_per_token']:.1f}",
              _num(r["kl"], ".4f"), _num(r["kl_t2"], ".3f"), _num(r["tv"], ".4f"), _num(r["dkl_t1"], ".1e"), _num(r["dkl_t2"], ".1e"),
              f"{r['write_tokens_per_s']:,.0f}", f"{r['read_tokens_per_s']:,.0f}"] for r in rows]
    lines += [[f"{r['vocab']:,}" if r["vocab"] else "?", "real", r["method"], r["source"], "-", f"~{r['bytes_per_token']}",
               *["-"] * 7] for r in REFERENCES]
    return table(header, lines)


def format_value_dtypes(run: dict[str, Any]) -> str:
    return f"top-k value dtype, vocab {run['vocab']:,}, {run['id_prior']} ids (compact stores the same bytes for both)\n\n" + table(
        ["method", "encoding", "values as", "KL", "KL T=2", "TV", "dKL T=1", "dKL T=2"],
        [[r["method"], r["encoding"], r["dtype"], _num(r["kl"], ".4f"), _num(r["kl_t2"], ".3f"), _num(r["tv"], ".4f"),
          _num(r["dkl_t1"], ".1e"), _num(r["dkl_t2"], ".1e")] for r in run["value_dtypes"]])


def format_ablation(vocab: int, prior: str, ablation_: dict[str, Any], clevels: list[int]) -> str:
    parts = [f"ablation, vocab {vocab:,}, {prior} ids (bytes of data per token, numcodecs Blosc as the store writes it)"]
    parts.append(table(["method", "encoding", *(f"zstd {level}" for level in clevels)],
                        [[r["method"], r["encoding"], *(f"{r['bytes_per_token'][level]:.1f}" for level in clevels)]
                         for r in ablation_["clevels"]]))
    parts.append(table(["method", "values stored as", "B/token", "dKL T=1", "dKL T=2"],
                        [[r["method"], r["quantizer"], f"{r['value_bytes_per_token']:.1f}", f"{r['dkl_t1']:.1e}", f"{r['dkl_t2']:.1e}"]
                         for r in ablation_["quantizers"]]))
    parts.append(table(["method", "plain ids", "sorted gaps", "Rice-coded gaps (bits only)", "log2 C(V,K) / 8"],
                        [[r["method"], f"{r['plain_ids']:.1f}", f"{r['gaps']:.1f}", f"{r['rice']:.1f}", f"{r['uniform_subset_bound']:.1f}"]
                         for r in ablation_["ids"]]))
    parts.append(table(["method", "sampled layout", "B/token"],
                        [[r["method"], r["layout"], f"{r['bytes_per_token']:.1f}"] for r in ablation_["sampled_layouts"]]))
    return "\n\n".join(parts)


def goal_lines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    for r in rows:
        limit = GOALS.get((r["mode"], r["width"]))
        if limit is not None and r["encoding"] != "plain" and r["backend"] == "zarr" and r["vocab"] == 131072:
            if r["encoding"] == "entropy":
                limit = ENTROPY_GOALS[r["mode"], r["width"]][0 if r["id_prior"] == "zipf" else 1]
            goals.append({"id_prior": r["id_prior"], "method": r["method"], "encoding": r["encoding"],
                          "bytes_per_token": r["bytes_per_token"], "reference": limit, "met": r["bytes_per_token"] <= limit})
    return goals


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, help="tokens per vocab and id prior (default 16384; 2048 with --quick)")
    parser.add_argument("--fidelity-tokens", type=int, help="tokens the KL/TV columns average over (default 4096; 1024 with --quick)")
    parser.add_argument("--vocabs", type=_ints, default=[32768, 131072], help="comma list (default 32768,131072)")
    parser.add_argument("--id-prior", default="zipf,uniform", help="comma list of zipf,uniform (default both)")
    parser.add_argument("--zipf-exponent", type=float, default=1.0, help="a of the Zipf id prior 1/(i+1)^a (default 1)")
    parser.add_argument("--sharpness-mu", type=float, default=0.55, help="mean of log s, the per-token sharpness (default 0.55)")
    parser.add_argument("--sharpness-sigma", type=float, default=0.35, help="std of log s (default 0.35)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="logical value dtype (default float16)")
    parser.add_argument("--batch-rows", type=int, default=4096, help="rows per ShardWriter.append (default 4096)")
    parser.add_argument("--repeats", type=int, help="write/read timings, best of (default 3; 1 with --quick)")
    parser.add_argument("--clevels", type=_ints, default=[1, 3, 9], help="zstd levels for the ablation (default 1,3,9)")
    parser.add_argument("--no-hdf5", action="store_true", help="skip the plain HDF5 comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the logits and the sampling (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (2k tokens)")
    parser.add_argument("--json", default="data/bench_lm_storage.json", help="where to write results (default data/bench_lm_storage.json)")
    parser.add_argument("--workdir", help="scratch directory (default: a fresh temporary one, removed afterwards)")
    parser.add_argument("--keep", action="store_true", help="keep the shards")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (2048 if args.quick else 16384)
    args.fidelity_tokens = min(args.tokens, args.fidelity_tokens or (1024 if args.quick else 4096))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.priors = [p.strip() for p in args.id_prior.split(",") if p.strip()]
    if not args.priors or any(p not in ("zipf", "uniform") for p in args.priors):
        parser.error(f"--id-prior {args.id_prior!r}: use a comma list of zipf, uniform")
    if not args.vocabs or min(args.vocabs) <= max(w for _, w in METHODS) or min(args.tokens, args.batch_rows, args.repeats) < 1:
        parser.error("vocabularies must exceed the largest K, and sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    runs = []
    with scratch_dir(args.workdir, args.keep, "bench-lm-storage-") as workdir:
        for index, prior in enumerate(args.priors):
            for num_classes in args.vocabs:
                runs.append(measure(args, workdir, num_classes, prior, with_hdf5=index == 0 and not args.no_hdf5))
        samples = per_sample(args, workdir)
    rows = [row for run in runs for row in run["rows"]]
    report = {
        "config": {key: value for key, value in vars(args).items() if key != "id_prior"}
        | {"methods": [method_name(*m) for m in METHODS], "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])},
        "machine": machine_info(torch.device("cpu")),
        "runs": runs,
        "references": REFERENCES,
        "goals": goal_lines(rows),
        "per_sample": samples,
        "total_seconds": time.perf_counter() - started,
    }
    machine = report["machine"]
    print(f"\n{machine['cpu_count']} CPUs ({machine['torch_threads']} torch threads), torch {machine['torch_version']}, "
          f"zarr {machine.get('zarr_version')}; {args.tokens} tokens per vocab and id prior, values {args.dtype}; "
          f"KL/TV over the first {args.fidelity_tokens} tokens")
    for run in runs:
        print(f"vocab {run['vocab']:,}, {run['id_prior']} ids: " + ", ".join(f"{k} {v:.3f}" for k, v in run["stats"].items()))
    print(format_main(rows))
    for run in runs:
        if "value_dtypes" in run:
            print("\n" + format_value_dtypes(run))
    for run in runs:
        if "ablation" in run:
            print("\n" + format_ablation(run["vocab"], run["id_prior"], run["ablation"], args.clevels))
    print("\nper-sample (vision) rows\n\n" + table(["classes", "k", "encoding", "B/row", "KL", "dKL T=1", "write rows/s"], [
        [f"{r['classes']:,}", str(r["k"]), r["encoding"], f"{r['bytes_per_row']:.1f}", f"{r['kl']:.4f}", f"{r['dkl_t1']:.1e}",
         f"{r['write_rows_per_s']:,.0f}"] for r in samples]))
    print()
    for goal in report["goals"]:
        print(f"goal, vocab 131,072, {goal['id_prior']} ids: {goal['encoding']} {goal['method']} {goal['bytes_per_token']:.1f} B/token "
              f"vs ~{goal['reference']}: {'met' if goal['met'] else 'NOT met'}")
    print(f"total {report['total_seconds']:.0f} s")
    print(f"wrote {write_report(args.json, report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
