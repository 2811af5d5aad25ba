"""``topk_log_tail``: the exact tail mass of plain top-k caches, against float64 references.

A confident teacher (top logits near 20 and 30, the rest spread) has tails of 1e-9 to 1e-4, which
``1 - sum(exp(topk_logits - logsumexp))`` cannot give from float16 values: the encoder's own array,
a real dump's stored array re-read, the reconstruction's KL to the teacher, the losses with and
without the array, and a cache written before the array existed, which still trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import RaggedTokens, causal_bag, read_plain, spec
from torch import nn

from logit_cache import DumpConfig, TrainConfig, dump, open_cache, train
from logit_cache.io.reader import CacheReader
from logit_cache.losses import kd_loss, token_kd_loss
from logit_cache.store import BACKENDS
from logit_cache.targets import LOG_MASS_FLOOR, Targets, get_kind, topk_log_probs
from logit_cache.tools.verify import verify_cache

VOCAB = 300
THIS = f"{Path(__file__).resolve()}:confident_bag"


def confident_logits(rows: int = 64, classes: int = 3000, seed: int = 0) -> torch.Tensor:
    """Rows spread as 2 * N(0, 1), each with one logit near 20 or near 30 (every fourth also a second near 17 or 27)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=g) * 2
    tops = torch.tensor([20.0, 30.0]).repeat((rows + 1) // 2)[:rows] + torch.rand(rows, generator=g)
    x[torch.arange(rows), torch.randint(10, classes, (rows,), generator=g)] = tops
    x[::4, 5] = tops[::4] - 3
    return x


def tail_reference(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 mass outside the ids [B, K] of each row, summed over the other logits (no cancellation)."""
    x = logits.double()
    outside = x.scatter(1, ids.long(), float("-inf"))
    return torch.exp(torch.logsumexp(outside, 1) - torch.logsumexp(x, 1))


def old_tail(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """What a reader without the array gets (float64, so only the values' rounding is in it): 1 - sum p."""
    return 1.0 - torch.exp(values.double() - lse.double()[:, None]).sum(1)


# -- the encoder ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8])
def test_encoded_tail_matches_a_float64_reference(dtype: torch.dtype, k: int) -> None:
    logits = confident_logits().to(dtype)
    encoded = get_kind("topk").encode(logits, k, "float16")
    tail = tail_reference(logits, encoded.arrays["topk_indices"])
    assert tail.min() < 1e-8 and tail.max() > 1e-5  # confident rows, some very
    got = encoded.arrays["topk_log_tail"]
    assert got.dtype == torch.float32 and got.shape == (64,)
    assert ((got.double().exp() - tail).abs() / tail).max() < 1e-4  # far inside the 1e-3 asked for, at every size
    lse = torch.logsumexp(logits.double(), 1)
    assert (encoded.arrays["logsumexp"].double() - lse).abs().max() < 4e-6  # float32 near 30: ulp 2e-6
    # the float16 values alone cannot give these tails: most come out empty or negative
    assert (old_tail(encoded.arrays["topk_logits"], encoded.arrays["logsumexp"]) <= 0).float().mean() > 0.2
    # coverage (the dump's report) is 1 - tail
    assert float(encoded.topk_mass) == pytest.approx(float((1 - tail).sum()), rel=1e-6)


def test_no_tail_when_k_is_every_class() -> None:
    logits = confident_logits(rows=6, classes=40)
    encoded = get_kind("topk").encode(logits, 40, "float32")
    assert torch.equal(encoded.arrays["topk_log_tail"], torch.full((6,), LOG_MASS_FLOOR))
    log_p, log_rest = topk_log_probs(encoded.arrays["topk_logits"], encoded.arrays["logsumexp"], 1.0, 40,
                                     encoded.arrays["topk_log_tail"])
    want = torch.log_softmax(logits.double(), 1).gather(1, encoded.arrays["topk_indices"].long())
    assert torch.allclose(log_p.double(), want, atol=1e-5) and torch.all(log_rest == LOG_MASS_FLOOR)


def test_ties_at_the_kth_value_count_in_the_tail() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 0] = 5.0  # then nine tied zeros: two are kept, seven are the tail
    encoded = get_kind("topk").encode(logits, 3, "float32")
    want = 7 / (math.exp(5) + 9)
    assert torch.allclose(encoded.arrays["topk_log_tail"].double().exp(), torch.full((3,), want, dtype=torch.float64), rtol=1e-6)


# -- topk_log_probs and the losses ----------------------------------------------------------------------------------


def reference_teacher(values: torch.Tensor, ids: torch.Tensor, log_tail: torch.Tensor, classes: int, temperature: float) -> torch.Tensor:
    """The dense teacher [B, C] (float64) of the tail model with a stored tail, from its definition: the top-k
    logits as stored, every other logit u with (C - K) exp(u) = Z' r, Z' = sum exp(v) / (1 - r); softmax at T."""
    v = values.double()
    r = log_tail.double().exp()
    log_z = torch.logsumexp(v, 1) - torch.log1p(-r)
    u = log_z + torch.log(r) - math.log(classes - v.shape[1])
    dense = u[:, None].expand(len(v), classes).clone().scatter_(1, ids.long(), v)
    return torch.softmax(dense / temperature, 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_topk_log_probs_with_a_stored_tail(temperature: float) -> None:
    logits = confident_logits(rows=16, classes=200)
    encoded = get_kind("topk").encode(logits, 6, "float16")
    values, ids, lse, log_tail = (encoded.arrays[n] for n in ("topk_logits", "topk_indices", "logsumexp", "topk_log_tail"))
    log_p, log_rest = topk_log_probs(values, lse, temperature, 200, log_tail)
    dense = reference_teacher(values, ids, log_tail, 200, temperature)
    assert torch.allclose(log_p.double().exp(), dense.gather(1, ids.long()), rtol=1e-5, atol=1e-12)
    rest = dense.scatter(1, ids.long(), 0.0).sum(1)  # summed, not 1 - top: no cancellation
    assert torch.allclose(log_rest.double().exp(), rest, rtol=1e-4, atol=1e-30)
    if temperature == 1.0:  # at T=1 the tail is exactly the stored one, and top + tail sums to 1
        assert torch.allclose(log_rest, log_tail, atol=1e-6, rtol=0)
        assert torch.allclose(log_p.double().exp().sum(1) + log_rest.double().exp(), torch.ones(16, dtype=torch.float64), atol=1e-6)


def old_log_probs(values: torch.Tensor, lse: torch.Tensor, temperature: float, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail model before the array existed (float64): tail r = 1 - sum p, floored; u from logsumexp."""
    v, lse = values.double(), lse.double()
    r = (1 - torch.exp(v - lse[:, None]).sum(1)).clamp(min=math.exp(LOG_MASS_FLOOR))
    tail_t = math.log(classes - v.shape[1]) + (lse + torch.log(r) - math.log(classes - v.shape[1])) / temperature
    log_z = torch.logsumexp(torch.cat([v / temperature, tail_t[:, None]], 1), 1)
    return v / temperature - log_z[:, None], tail_t - log_z


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_without_the_array_the_losses_are_as_before(temperature: float) -> None:
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(3)) * 3
    arrays = {n: t.numpy() for n, t in get_kind("topk").encode(logits, 5, "float32").arrays.items()}
    without = Targets.from_arrays("topk", 50, {n: a for n, a in arrays.items() if n != "topk_log_tail"})
    assert without.log_tail is None
    log_p, log_rest = topk_log_probs(without.values, without.logsumexp, temperature, 50, without.log_tail)
    want_p, want_rest = old_log_probs(without.values, without.logsumexp, temperature, 50)
    assert torch.allclose(log_p.double(), want_p, atol=1e-5) and torch.allclose(log_rest.double(), want_rest, atol=1e-4)
    student = torch.randn(12, 50, generator=torch.Generator().manual_seed(4))
    with_tail = Targets.from_arrays("topk", 50, arrays)
    assert with_tail.log_tail is not None and with_tail.to("cpu").log_tail.dtype == torch.float32
    # float32 values: the derived tail and the stored one agree, so both give the same loss
    a, b = kd_loss(student, without, temperature), kd_loss(student, with_tail, temperature)
    assert float(a) == pytest.approx(float(b), rel=1e-4)


@pytest.mark.parametrize("tail", ["rest", "ignore"])
def test_losses_read_the_stored_tail(tail: str) -> None:
    """float16 values of confident rows: every loss (kd_loss, its fused CE + KD, token_kd_loss) uses the stored
    tail, and equals the dense KL against the tail model's teacher built from it."""
    from logit_cache.losses import DistillationLoss, KLDivergence
    from logit_cache.losses.fused import fused_distillation_loss

    logits = confident_logits(rows=16, classes=200)
    arrays = {n: t.numpy() for n, t in get_kind("topk").encode(logits, 6, "float16").arrays.items()}
    target = Targets.from_arrays("topk", 200, arrays)
    student = (torch.randn(16, 200, generator=torch.Generator().manual_seed(5)) * 2).double()
    temperature = 2.0
    dense = reference_teacher(target.values, target.indices, target.log_tail, 200, temperature)
    log_q = torch.log_softmax(student / temperature, 1)
    ids = target.indices.long()
    in_top = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, ids, True)
    p_k, log_q_k = dense.gather(1, ids), log_q.gather(1, ids)
    per_row = (p_k * (p_k.log() - log_q_k)).sum(1)
    if tail == "rest":  # the tail as one bucket
        p_r = dense.masked_fill(in_top, 0).sum(1)
        q_r = log_q.exp().masked_fill(in_top, 0).sum(1)
        per_row = per_row + p_r * (p_r.log() - q_r.log())
    else:  # ignore: the top-k's cross-entropy terms only, plus their entropy
        per_row = (p_k * p_k.log()).sum(1) - (p_k * log_q_k).sum(1)
    want = per_row.mean() * temperature**2
    got = kd_loss(student.float(), target, temperature, tail=tail)
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    got_token = token_kd_loss(student.float(), target, temperature, tail=tail, chunk_tokens=5)
    assert float(got_token) == pytest.approx(float(want), rel=1e-4)
    combined = DistillationLoss(KLDivergence(temperature, tail), kd_loss_weight=1.0, org_loss_weight=0.0)
    assert float(combined(student.float().requires_grad_(), None, target).detach()) == pytest.approx(float(want), rel=1e-4)
    fused = fused_distillation_loss(student.float(), None, target.to("cpu"), temperature, tail, 1.0, 0.0)
    assert float(fused) == pytest.approx(float(want), rel=1e-4)
    # and the stored tail matters here: the derived one (float16 values) gives another loss
    derived = Targets.from_arrays("topk", 200, {n: a for n, a in arrays.items() if n != "topk_log_tail"})
    assert abs(float(kd_loss(student.float(), derived, temperature, tail=tail)) - float(want)) > 1e-3 * abs(float(want))


# -- through a dump -------------------------------------------------------------------------------------------------


class ConfidentBag(nn.Module):
    """:func:`causal_bag` with one logit per position lifted to 20 or 30 (by the position's parity): a confident
    per-token teacher whose logits at t depend on ids[:t+1] only."""

    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.bag = causal_bag(vocab=vocab, dim=8, scale=2.0)

    def forward(self, input_ids, attention_mask=None):
        logits = self.bag(input_ids)  # (B, T, V)
        lift = 20.0 + 10.0 * (torch.arange(input_ids.shape[1]) % 2).float()  # (T,)
        top = (input_ids * 7 + 3) % logits.shape[-1]  # (B, T): the confident id of each position
        return logits.scatter(2, top[..., None], lift[None, :, None].expand(*top.shape, 1))


def confident_bag(vocab: int = VOCAB) -> ConfidentBag:
    return ConfidentBag(vocab)


def _dump(tmp_path: Path, name: str, **kw) -> tuple[Path, ConfidentBag]:
    torch.manual_seed(0)
    model = confident_bag().eval()
    teacher = tmp_path / "confident.pt"
    torch.save(model.state_dict(), teacher)
    config = DumpConfig(teacher=str(teacher), arch=THIS, arch_kwargs={"vocab": VOCAB}, dataset=spec("ragged_tokens"),
                        dataset_kwargs={"vocab": VOCAB}, out=str(tmp_path / name), quiet=True, batch_size=7, mode="topk", **kw)
    return dump(config).out, model


def _teacher_logits(model: nn.Module) -> torch.Tensor:
    """Every real token's logits, sequence after sequence (the cache's row order), each sequence alone."""
    with torch.no_grad():
        return torch.cat([model(seq[None])[0] for seq in RaggedTokens(vocab=VOCAB).seqs])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_dump_stores_the_exact_tail(tmp_path: Path, backend: str) -> None:
    out, model = _dump(tmp_path, "top4", k=4, dtype="float16", backend=backend, shard_rows=60)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arrays"]["topk_log_tail"]["dtype"] == "float32"
    stored, ids = read_plain(out, "topk_log_tail"), read_plain(out, "topk_indices")  # plain zarr / h5py
    teacher = _teacher_logits(model)
    assert stored.shape == (len(teacher),) and stored.dtype == np.float32
    tail = tail_reference(teacher, torch.from_numpy(ids.astype(np.int64)))
    assert tail.min() < 1e-9 and tail.max() > 1e-6
    assert np.abs(np.exp(stored.astype(np.float64)) / tail.numpy() - 1).max() < 1e-3
    # the reader serves it as Targets.log_tail
    batch = open_cache(out).sample_targets(np.arange(40))
    assert np.array_equal(batch.log_tail.numpy(), stored)


def _reconstruction_kl(values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, log_tail: torch.Tensor | None,
                       teacher: torch.Tensor) -> torch.Tensor:
    """Per-row KL(teacher || reconstruction) at T=1 in float64: the reconstruction's top-k and its tail spread evenly."""
    classes = teacher.shape[1]
    log_p, log_rest = topk_log_probs(values, lse, 1.0, classes, log_tail)
    rest = log_rest.double() - math.log(classes - values.shape[1])
    recon = rest[:, None].expand(len(values), classes).clone().scatter_(1, ids.long(), log_p.double())
    truth = torch.log_softmax(teacher.double(), 1)
    return (truth.exp() * (truth - recon)).sum(1)


def test_float16_cache_keeps_confident_tails(tmp_path: Path) -> None:
    half, model = _dump(tmp_path, "h", k=4, dtype="float16")
    full, _ = _dump(tmp_path, "f", k=4, dtype="float32")
    teacher = _teacher_logits(model)
    a, b = open_cache(half).sample_targets(np.arange(40)), open_cache(full).sample_targets(np.arange(40))
    assert a.values.dtype == torch.float16 and a.log_tail is not None
    _, log_rest = topk_log_probs(a.values, a.logsumexp, 1.0, VOCAB, a.log_tail)
    assert torch.all(torch.isfinite(log_rest)) and torch.all(log_rest > LOG_MASS_FLOOR + 1)  # no empty tail
    assert (old_tail(a.values, a.logsumexp) <= 0).any()  # without the array some read back empty or negative
    kl_half = _reconstruction_kl(a.values, a.indices, a.logsumexp, a.log_tail, teacher)
    kl_full = _reconstruction_kl(b.values, b.indices, b.logsumexp, b.log_tail, teacher)
    assert abs(kl_half.mean() - kl_full.mean()) < 1e-4  # nats per token
    kl_derived = _reconstruction_kl(a.values, a.indices, a.logsumexp, None, teacher)
    assert kl_derived.mean() > kl_half.mean()  # what the array buys


def _drop_log_tail(cache: Path) -> None:
    """The cache as a dump before ``topk_log_tail`` existed wrote it: the array gone from every shard and from
    the manifest's arrays, the shards' checksums recomputed."""
    import h5py
    import zarr

    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        shard = cache / entry["path"]
        if shard.is_dir():
            del zarr.open_group(str(shard), mode="r+")["topk_log_tail"]
        else:
            with h5py.File(shard, "r+") as handle:
                del handle["topk_log_tail"]
    del manifest["arrays"]["topk_log_tail"]
    manifest_path.write_text(json.dumps(manifest, indent=2))
    with CacheReader(cache) as reader:
        for position, entry in enumerate(manifest["shards"]):
            entry["checksum"] = reader.shard(position).checksum()
    manifest_path.write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_cache_without_the_array_reads_and_trains(tmp_path: Path, backend: str) -> None:
    out, _ = _dump(tmp_path, "old", k=4, dtype="float32", backend=backend)
    before = open_cache(out).sample_targets(np.arange(40))
    _drop_log_tail(out)
    cache = open_cache(out)
    assert "topk_log_tail" not in cache.manifest.arrays
    with CacheReader(out) as reader:
        assert reader.verify_checksums() == []
    after = cache.sample_targets(np.arange(40))
    assert after.log_tail is None
    assert torch.equal(after.values, before.values) and torch.equal(after.logsumexp, before.logsumexp)
    # float32 values: the derived tail is close to the stored one, so the loss barely moves
    student = torch.randn(len(after), VOCAB, generator=torch.Generator().manual_seed(1))
    assert float(token_kd_loss(student, after, 1.0)) == pytest.approx(float(token_kd_loss(student, before, 1.0)), rel=1e-3)
    result = train(TrainConfig(student=spec("causal_bag"), student_kwargs={"vocab": VOCAB, "dim": 4}, out=str(tmp_path / "s.pt"),
                               dataset=spec("ragged_tokens"), dataset_kwargs={"vocab": VOCAB}, caches=[str(out)], epochs=1,
                               batch_size=8, quiet=True, temperature=1.0))
    assert np.isfinite(result.final["train_loss"])


def test_dense_reference_is_a_distribution() -> None:
    """The helper the loss tests lean on: rows sum to 1 and keep the stored tail at T=1."""
    logits = confident_logits(rows=4, classes=50)
    encoded = get_kind("topk").encode(logits, 3, "float32")
    dense = reference_teacher(encoded.arrays["topk_logits"], encoded.arrays["topk_indices"], encoded.arrays["topk_log_tail"], 50, 1.0)
    assert torch.allclose(dense.sum(1), torch.ones(4, dtype=torch.float64))
    outside = dense.scatter(1, encoded.arrays["topk_indices"].long(), 0.0).sum(1)
    assert torch.allclose(outside.log(), encoded.arrays["topk_log_tail"].double(), atol=1e-6)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_cache_without_the_array_verifies(tmp_path: Path, backend: str) -> None:
    out, _ = _dump(tmp_path, "old", k=4, dtype="float16", backend=backend)
    _drop_log_tail(out)
    report = verify_cache(out, progress=False)
    assert report.ok, report.failures


def test_compact_caches_with_a_float16_tail_still_read_and_verify(tmp_path: Path) -> None:
    """Compact caches stored the tail as float16 before it became the float32 logical array."""
    import h5py

    out, _ = _dump(tmp_path, "c", k=4, dtype="float32", encoding="compact", backend="hdf5")
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["arrays"]["topk_log_tail"]["dtype"] == "float32"
    before = open_cache(out).sample_targets(np.arange(40))
    for entry in manifest["shards"]:
        with h5py.File(out / entry["path"], "r+") as handle:
            tail = handle["topk_log_tail"][:]
            del handle["topk_log_tail"]
            handle.create_dataset("topk_log_tail", data=tail.astype(np.float16))
    manifest["arrays"]["topk_log_tail"]["dtype"] = "float16"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    with CacheReader(out) as reader:
        for position, entry in enumerate(manifest["shards"]):
            entry["checksum"] = reader.shard(position).checksum()
    manifest_path.write_text(json.dumps(manifest, indent=2))
    after = open_cache(out).sample_targets(np.arange(40))
    assert after.log_tail.dtype == torch.float32
    assert torch.allclose(after.log_tail, before.log_tail.half().float())
    assert torch.equal(after.indices, before.indices)
    report = verify_cache(out, progress=False)
    assert report.ok, report.failures
