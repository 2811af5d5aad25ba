"""Per-token (language-model) caches: ragged rows and offsets, top-k and sampled encodings, large
vocabularies, the loader and the token-level trainer, each against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import RaggedTokens, causal_bag, read_plain, spec

from logit_cache import DumpConfig, TrainConfig, dump, open_cache, train
from logit_cache.errors import DatasetMismatchError
from logit_cache.store import BACKENDS
from logit_cache.targets import encode
from logit_cache.tokens import TokenWindows, collate_tokens, next_token_mask

VOCAB = 50
ARCH = spec("causal_bag")


def _teacher(tmp_path: Path, vocab: int = VOCAB, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = causal_bag(vocab=vocab).eval()
    path = tmp_path / f"bag{vocab}.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _dump(tmp_path: Path, teacher: Path, name: str, vocab: int = VOCAB, dataset_kwargs: dict | None = None, **kw) -> Path:
    config = DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs={"vocab": vocab}, dataset=spec("ragged_tokens"),
                        dataset_kwargs={"vocab": vocab, **(dataset_kwargs or {})}, out=str(tmp_path / name), quiet=True, **kw)
    return dump(config).out


def _reference_logits(model: torch.nn.Module, dataset: RaggedTokens) -> list[torch.Tensor]:
    """Each sequence alone through the teacher, no padding: (L, V) per item."""
    with torch.no_grad():
        return [model(seq[None])[0] for seq in dataset.seqs]


def _global_offsets(out: Path) -> np.ndarray:
    """DESIGN.md: each shard's offsets[:-1] + row_start, in shard order, then num_rows (read with plain zarr/h5py)."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        one = read_plain_shard(out, shard["path"], manifest["backend"], "offsets")
        assert one[0] == 0 and one[-1] == shard["row_stop"] - shard["row_start"]
        parts.append(one[:-1] + shard["row_start"])
    return np.concatenate([*parts, [manifest["num_rows"]]])


def read_plain_shard(out: Path, name: str, backend: str, array: str) -> np.ndarray:
    if backend == "zarr":
        import zarr

        return zarr.open_group(str(out / name), mode="r")[array][:]
    import h5py

    with h5py.File(out / name, "r") as handle:
        return handle[array][:]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("style", ["ids", "dict", "pair"])
def test_rows_are_real_tokens_with_offsets_and_match_the_teacher(tmp_path: Path, backend: str, style: str) -> None:
    teacher, model = _teacher(tmp_path)
    out = _dump(tmp_path, teacher, f"top5-{backend}-{style}", dataset_kwargs={"style": style}, mode="topk", k=5,
                dtype="float32", backend=backend, shard_rows=60, batch_size=7)
    dataset = RaggedTokens(vocab=VOCAB, style=style)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["per_token"] is True and manifest["num_samples"] == 40
    assert manifest["num_rows"] == int(dataset.lengths.sum())  # padding never stored
    assert len(manifest["shards"]) > 2  # shards cut at sequence ends
    offsets = _global_offsets(out)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(dataset.lengths)]))
    values, ids = read_plain(out, "topk_logits"), read_plain(out, "topk_indices")
    assert ids.dtype == np.uint16
    for i, logits in enumerate(_reference_logits(model, dataset)):
        top = torch.topk(logits, 5, dim=-1)
        rows = slice(offsets[i], offsets[i + 1])
        np.testing.assert_allclose(values[rows], top.values.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ids[rows], top.indices.numpy())
        np.testing.assert_allclose(read_plain(out, "logsumexp")[rows], torch.logsumexp(logits, -1).numpy(), rtol=1e-5)


def test_sampled_counts_sum_to_m_ids_are_unique_and_draws_do_not_depend_on_batching(tmp_path: Path) -> None:
    teacher, _ = _teacher(tmp_path)
    a = _dump(tmp_path, teacher, "s-a", mode="sampled", m=40, batch_size=3, seed=7)
    b = _dump(tmp_path, teacher, "s-b", mode="sampled", m=40, batch_size=16, shard_rows=50, seed=7)
    ids, counts = read_plain(a, "sampled_indices"), read_plain(a, "sampled_counts")
    assert counts.dtype == np.uint8 and ids.dtype == np.uint16
    np.testing.assert_array_equal(counts.sum(axis=1), 40)
    for row_ids, row_counts in zip(ids, counts, strict=True):
        used = row_counts > 0
        assert used[: used.sum()].all()  # left-aligned
        assert np.all(np.diff(row_ids[used].astype(int)) > 0)  # distinct, ascending
        assert not row_ids[~used].any()  # pads are id 0
    # seeded per item: another batch size and shard size draw the very same ids
    np.testing.assert_array_equal(ids, read_plain(b, "sampled_indices"))
    np.testing.assert_array_equal(counts, read_plain(b, "sampled_counts"))
    c = _dump(tmp_path, teacher, "s-c", mode="sampled", m=40, seed=8)
    assert not np.array_equal(counts, read_plain(c, "sampled_counts"))  # the seed matters


def test_sampled_counts_are_an_unbiased_estimate_of_the_teacher_probabilities() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 30) * 2.0
    rows, m = 4000, 25
    encoded = encode(logits.expand(rows, -1).contiguous(), "sampled", None, "float32", m=m,
                     generator=torch.Generator().manual_seed(0))
    ids, counts = encoded.arrays["sampled_indices"].long(), encoded.arrays["sampled_counts"].long()
    estimate = torch.zeros(rows, 30).scatter_add_(1, ids, counts.double().float()).mean(0) / m  # mean of counts/M
    p = torch.softmax(logits[0], -1)
    standard_error = torch.sqrt(p * (1 - p) / (m * rows))
    z = (estimate - p) / standard_error.clamp(min=1e-12)
    assert z.abs().max() < 4.5, z  # 30 ids, fixed seed: every one within 4.5 standard errors


def test_sample_temperature_stores_the_drawn_logits(tmp_path: Path) -> None:
    teacher, model = _teacher(tmp_path)
    out = _dump(tmp_path, teacher, "s-t2", mode="sampled", m=30, sample_temperature=2.0, dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_temperature"] == 2.0 and "sampled_logits" in manifest["arrays"]
    dataset = RaggedTokens(vocab=VOCAB)
    reference = torch.cat(_reference_logits(model, dataset))  # (rows, V)
    ids, counts = read_plain(out, "sampled_indices"), read_plain(out, "sampled_counts")
    drawn = read_plain(out, "sampled_logits")
    expected = reference.gather(1, torch.from_numpy(ids.astype(np.int64))).numpy()
    np.testing.assert_allclose(drawn[counts > 0], expected[counts > 0], rtol=1e-5, atol=1e-5)
    # a flatter draw at Ts = 2: more distinct ids per token than at Ts = 1 with the same seed
    plain = _dump(tmp_path, teacher, "s-t1", mode="sampled", m=30)
    assert (counts > 0).sum() > (read_plain(plain, "sampled_counts") > 0).sum()


def test_a_vocabulary_above_65536_stores_int32_ids(tmp_path: Path) -> None:
    vocab = 70_000
    teacher, model = _teacher(tmp_path, vocab=vocab)
    out = _dump(tmp_path, teacher, "big", vocab=vocab, dataset_kwargs={"n": 6, "max_len": 5}, mode="topk", k=4, dtype="float32")
    ids = read_plain(out, "topk_indices")
    assert ids.dtype == np.int32 and ids.max() > 65535
    dataset = RaggedTokens(n=6, vocab=vocab, max_len=5)
    reference = torch.cat(_reference_logits(model, dataset))
    np.testing.assert_array_equal(ids, torch.topk(reference, 4, -1).indices.numpy())
    sampled = _dump(tmp_path, teacher, "big-s", vocab=vocab, dataset_kwargs={"n": 6, "max_len": 5}, mode="sampled", m=8)
    assert read_plain(sampled, "sampled_indices").dtype == np.int32


def test_token_windows_cut_a_flat_array_with_the_documented_stride(tmp_path: Path) -> None:
    flat = np.arange(1000, 1023, dtype=np.int32)
    path = tmp_path / "ids.npy"
    np.save(path, flat)
    windows = TokenWindows(path, seq_len=8, stride=6)
    starts = list(range(0, len(flat) - 1, 6))  # 0, 6, 12, 18 (18..22: 5 tokens)
    assert len(windows) == len(starts)
    for i, start in enumerate(starts):
        np.testing.assert_array_equal(windows[i].numpy(), flat[start : start + 8])
    np.testing.assert_array_equal(windows.token_lengths(), [8, 8, 8, 5])
    assert len(TokenWindows(np.arange(17), seq_len=8)) == 2  # the last lone token predicts nothing: dropped


def test_the_loader_pairs_each_sequence_with_its_rows(tmp_path: Path) -> None:
    teacher, model = _teacher(tmp_path)
    out = _dump(tmp_path, teacher, "full", mode="full", dtype="float32", shard_rows=50)
    cache = open_cache(out)
    dataset = RaggedTokens(vocab=VOCAB)
    wrapped = cache.wrap(dataset)
    loader = torch.utils.data.DataLoader(wrapped, batch_size=6, sampler=cache.sampler(seed=3), collate_fn=cache.collate)
    order = list(cache.sampler(seed=3))
    seen = 0
    reference = _reference_logits(model, dataset)
    for inputs, labels, target in loader:
        chosen = order[seen : seen + len(inputs)]
        seen += len(inputs)
        expected = torch.cat([reference[i] for i in chosen])
        torch.testing.assert_close(target.logits, expected, rtol=1e-5, atol=1e-5)
        assert target.lengths.tolist() == [len(dataset.seqs[i]) for i in chosen]
        assert inputs.shape == labels.shape == (len(chosen), max(target.lengths.tolist()))
        assert (labels[torch.arange(inputs.shape[1])[None, :] >= target.lengths[:, None]] == -100).all()  # padding ignored
    assert seen == len(dataset)
    # another dataset of the same length but other sequences is refused (fingerprint), and so are other lengths
    with pytest.raises(DatasetMismatchError, match="differs from what the cache was dumped from"):
        cache.wrap(RaggedTokens(vocab=VOCAB, seed=1))
    wrapped = cache.wrap(RaggedTokens(vocab=VOCAB, seed=1), verify="length")
    with pytest.raises(DatasetMismatchError, match="tokens but the cache holds"):
        cache.collate(wrapped.__getitems__([0, 1, 2]))


def test_training_from_a_full_cache_equals_online_kd(tmp_path: Path) -> None:
    teacher, _ = _teacher(tmp_path)
    out = _dump(tmp_path, teacher, "full32", mode="full", dtype="float32")
    common = dict(student=ARCH, student_kwargs={"vocab": VOCAB, "dim": 4}, dataset=spec("ragged_tokens"),
                  dataset_kwargs={"vocab": VOCAB}, epochs=2, batch_size=8, lr=1e-2, quiet=True, temperature=2.0)
    cached = train(TrainConfig(out=str(tmp_path / "a.pt"), caches=[str(out)], **common))
    online = train(TrainConfig(out=str(tmp_path / "b.pt"), teacher=str(teacher), arch=ARCH, arch_kwargs={"vocab": VOCAB}, **common))
    for a, b in zip(cached.epochs, online.epochs, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    # the positions trained on: those with a next token (every real token but each sequence's last)
    dataset = RaggedTokens(vocab=VOCAB)
    assert cached.final["tokens"] == int((dataset.lengths - 1).sum())


def test_eval_perplexity_is_exp_of_the_next_token_cross_entropy(tmp_path: Path) -> None:
    result = train(TrainConfig(student=ARCH, student_kwargs={"vocab": VOCAB, "dim": 4}, out=str(tmp_path / "s.pt"),
                               dataset=spec("ragged_tokens"), dataset_kwargs={"vocab": VOCAB, "style": "pair"}, labels_only=True,
                               epochs=1, batch_size=8, quiet=True, eval_dataset=spec("ragged_tokens"),
                               eval_dataset_kwargs={"vocab": VOCAB, "style": "pair", "seed": 5}))
    student = causal_bag(vocab=VOCAB, dim=4)
    student.load_state_dict(torch.load(result.out))
    data = RaggedTokens(vocab=VOCAB, style="pair", seed=5)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            ids, labels = data[i]
            logits = student(ids[None])[0]
            for t in range(len(ids) - 1):  # position t predicts labels[t + 1], unless it is -100
                if labels[t + 1] != -100:
                    total += float(torch.nn.functional.cross_entropy(logits[t : t + 1], labels[t + 1 : t + 2]))
                    count += 1
    assert result.final["eval_perplexity"] == pytest.approx(np.exp(total / count), rel=1e-4)


def test_next_token_mask_skips_the_last_token_padding_and_ignored_labels() -> None:
    batch = collate_tokens([(torch.tensor([5, 6, 7, 8]), torch.tensor([5, -100, 7, 8])), (torch.tensor([1, 2]), torch.tensor([1, 2]))])
    mask = next_token_mask(batch.labels, batch.lengths)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topk", "3", "--sample", "5"], "--topk and --sample are exclusive"),
        (["--sample", "4", "--views", "2"], "augmented views are for per-sample data"),
        (["--topk", "3", "--sample-temperature", "2"], "--sample-temperature applies to --sample"),
        (["--full", "--encoding", "compact"], "full logits are stored plain"),
        (["--topk", "51"], "exceeds the teacher's vocabulary of 50"),
    ],
)
def test_cli_errors_name_the_fix(tmp_path: Path, cli, args: list[str], message: str) -> None:
    teacher, _ = _teacher(tmp_path)
    result = cli("dump", "--teacher", teacher, "--arch", ARCH, "--dataset", spec("ragged_tokens"), "--out", tmp_path / "c", *args)
    assert result.exit_code != 0
    assert message in result.output


def test_sampling_per_sample_data_is_refused(tmp_path: Path, cli, teacher: Path) -> None:
    result = cli("dump", "--teacher", teacher, "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs", '{"hidden": 32}',
                 "--dataset", "digits", "--out", tmp_path / "c", "--sample", "5")
    assert result.exit_code != 0 and "--sample M is for per-token" in result.output


def test_a_per_sample_teacher_on_token_data_is_refused(tmp_path: Path, cli, teacher: Path) -> None:
    result = cli("dump", "--teacher", teacher, "--arch", "logit_cache.models:digits_mlp", "--arch-kwargs", '{"hidden": 32}',
                 "--dataset", spec("ragged_tokens"), "--out", tmp_path / "c", "--topk", "3")
    assert result.exit_code != 0 and "return logits [batch, tokens, vocab]" in result.output


def test_a_dump_that_died_midway_resumes_to_the_same_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled draws too: they are seeded per sequence, so the resumed shards draw what an uninterrupted dump draws."""
    teacher, _ = _teacher(tmp_path)
    flaky = dict(arch=spec("flaky_bag"), arch_kwargs={"vocab": VOCAB}, dataset=spec("ragged_tokens"), dataset_kwargs={"vocab": VOCAB},
                 teacher=str(teacher), mode="sampled", m=20, shard_rows=40, batch_size=2, quiet=True)
    whole = dump(DumpConfig(out=str(tmp_path / "whole"), **flaky)).out
    monkeypatch.setenv("FLAKY_BAG_CALLS", "12")
    with pytest.raises(Exception, match="flaky teacher"):
        dump(DumpConfig(out=str(tmp_path / "resumed"), **flaky))
    kept = sorted((tmp_path / "resumed.partial" / "progress").iterdir())
    assert 0 < len(kept) < len(json.loads((whole / "manifest.json").read_text())["shards"])
    monkeypatch.delenv("FLAKY_BAG_CALLS")
    result = dump(DumpConfig(out=str(tmp_path / "resumed"), resume=True, **flaky))
    assert result.resumed_shards == len(kept)
    a, b = json.loads((whole / "manifest.json").read_text()), json.loads((result.out / "manifest.json").read_text())
    assert [s["checksum"] for s in a["shards"]] == [s["checksum"] for s in b["shards"]]
    for name in ("sampled_indices", "sampled_counts", "logsumexp"):
        np.testing.assert_array_equal(read_plain(whole, name), read_plain(result.out, name))
    np.testing.assert_array_equal(_global_offsets(whole), _global_offsets(result.out))


def test_convert_carries_per_token_caches_and_their_sampled_logits(tmp_path: Path) -> None:
    from logit_cache import convert_cache

    teacher, _ = _teacher(tmp_path)
    src = _dump(tmp_path, teacher, "s16", mode="sampled", m=12, sample_temperature=2.0, shard_rows=70)
    h5 = convert_cache(src, tmp_path / "s16-h5", backend="hdf5")
    wide = convert_cache(src, tmp_path / "s32", dtype="float32")
    assert h5.manifest.key == json.loads((src / "manifest.json").read_text())["key"]
    direct32 = _dump(tmp_path, teacher, "direct32", mode="sampled", m=12, sample_temperature=2.0, dtype="float32")
    assert wide.manifest.key != json.loads((direct32 / "manifest.json").read_text())["key"]  # float16-rounded values: not a float32 dump
    assert read_plain(wide.dst, "sampled_logits").dtype == np.float32
    np.testing.assert_array_equal(read_plain(wide.dst, "sampled_logits"), read_plain(src, "sampled_logits").astype(np.float32))
    np.testing.assert_array_equal(_global_offsets(h5.dst), _global_offsets(src))


def test_full_mode_states_its_size_before_it_starts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    teacher, _ = _teacher(tmp_path)
    rows = int(RaggedTokens(vocab=VOCAB).lengths.sum())
    with caplog.at_level("INFO", logger="logit_cache.pipeline"):
        _dump(tmp_path, teacher, "full-size", mode="full")  # quiet: an info line; without --quiet a warning
    assert f"--full stores every logit: {rows} rows x {VOCAB} classes x 2 B" in caplog.text


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_compact_caches_decode_to_the_plain_ones(tmp_path: Path, backend: str) -> None:
    """Top-k: the same ids per token and probabilities within the 8-bit codes' bound; sampled: lossless."""
    teacher, _ = _teacher(tmp_path)
    plain = open_cache(_dump(tmp_path, teacher, f"p-{backend}", mode="topk", k=6, dtype="float32", backend=backend))
    compact = open_cache(_dump(tmp_path, teacher, f"c-{backend}", mode="topk", k=6, encoding="compact", backend=backend))
    assert compact.manifest.encoding == "compact" and "topk_codes" in compact.manifest.arrays
    assert compact.manifest.key != plain.manifest.key
    samples = np.arange(0, 40, 3)
    a, b = plain.sample_targets(samples), compact.sample_targets(samples)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.logsumexp, b.logsumexp)
    np.testing.assert_array_equal(np.sort(a.indices.numpy(), 1), np.sort(b.indices.numpy(), 1))
    p_plain = torch.exp(a.values.float() - a.logsumexp[:, None])  # descending, so the orders agree up to ties
    p_compact = torch.exp(b.values.float() - b.logsumexp[:, None])
    assert (p_compact.sqrt() - p_plain.sqrt()).abs().max() < 3 / 510  # the codes' bound, plus the row's rescaling
    sampled_plain = open_cache(_dump(tmp_path, teacher, f"sp-{backend}", mode="sampled", m=30, backend=backend))
    sampled_compact = open_cache(_dump(tmp_path, teacher, f"sc-{backend}", mode="sampled", m=30, encoding="compact", backend=backend))
    x, y = sampled_plain.sample_targets(samples), sampled_compact.sample_targets(samples)
    for name in ("indices", "counts", "logsumexp", "lengths"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name
    # and a student trains from it like from any cache
    result = train(TrainConfig(student=ARCH, student_kwargs={"vocab": VOCAB, "dim": 4}, out=str(tmp_path / f"s-{backend}.pt"),
                               dataset=spec("ragged_tokens"), dataset_kwargs={"vocab": VOCAB}, caches=[str(compact.path)], epochs=1,
                               batch_size=8, quiet=True))
    assert np.isfinite(result.final["train_loss"])
