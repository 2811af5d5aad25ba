"""Lightning on a cache: the DataModule, the sampler Lightning must not split twice, the loss mixin.

The losses are checked against the KD formula computed here from the teacher run in the test; the
DDP run (2 CPU ranks, gloo, Lightning relaunching a script written here) counts the cache rows each
rank was served, found back from the stored logits read with plain zarr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCH, ARCH_KWARGS, make_teacher
from data_factories import HERE, RaggedTokens, causal_bag, random_images, spec
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning_factories import Student, TokenStudent
from processes import free_port
from torch.utils.data import DataLoader

from logit_cache import DumpConfig, dump, open_cache
from logit_cache.data.loader import ChunkShuffleSampler, collate
from logit_cache.data.replay import default_view
from logit_cache.errors import UsageError
from logit_cache.integrations.lightning import CacheDataModule, CacheSampler, cache_sampler, check_train_samplers
from logit_cache.losses import DistillationLoss, KLDivergence

N, VIEWS, VOCAB = 120, 3, 50


def dump_images(out: Path, teacher: Path, dataset: str, **options) -> Path:
    dump(DumpConfig(teacher=str(teacher), arch=ARCH, arch_kwargs=json.loads(ARCH_KWARGS), dataset=spec(dataset), out=str(out),
                    mode="full", dtype="float32", shard_rows=50, quiet=True, **options))
    return out


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    return dump_images(tmp_path_factory.mktemp("lightning") / "images", teacher, "random_images", dataset_kwargs={"n": 64})


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    return dump_images(tmp_path_factory.mktemp("lightning") / "views", teacher, "three_rng_images", views=VIEWS, seed=5)


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def kd_reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, kd_weight: float,
                 ce_weight: float) -> float:
    """``kd_weight * T^2 * mean_rows KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE``, in float64."""
    s, t = student.double() / temperature, teacher.double() / temperature
    p = t.softmax(-1)
    kl = (p * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * temperature**2
    return float(kd_weight * kl + ce_weight * F.cross_entropy(student.double(), labels))


def test_single_process_loss_is_distillation_loss_on_each_batch(image_cache: Path) -> None:
    data = CacheDataModule(str(image_cache), random_images(n=64), batch_size=16, seed=3)
    student = Student()
    student.distillation = DistillationLoss(KLDivergence(temperature=2.0), kd_loss_weight=0.7, org_loss_weight=0.3)
    trainer(max_epochs=2).fit(student, datamodule=data)
    assert len(student.steps) == 8  # 64 / 16 per epoch, 2 epochs
    teacher = make_teacher()
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for step in student.steps:
        inputs, labels, target = step["batch"]
        with torch.no_grad():
            want = teacher(inputs)
        torch.testing.assert_close(target.logits, want, rtol=1e-6, atol=1e-6)  # the rows of these inputs
        expected = kd_reference(step["logits"], want, labels, 2.0, 0.7, 0.3)
        assert float(step["loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        seen[step["epoch"]].append(inputs)
    everything = random_images(n=64).images
    for batches in seen.values():  # each epoch: every item once, in a seeded order that changes with the epoch
        assert sorted(x.numpy().tobytes() for x in torch.cat(batches)) == sorted(x.numpy().tobytes() for x in everything)
    assert not torch.equal(torch.cat(seen[0]), torch.cat(seen[1]))
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, CacheSampler) and sampler.seed == 3


def test_per_token_loss_is_token_kd_at_t1_plus_ce(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = causal_bag(vocab=VOCAB).eval()
    torch.save(teacher.state_dict(), tmp_path / "bag.pt")
    out = tmp_path / "tokens"
    dump(DumpConfig(teacher=str(tmp_path / "bag.pt"), arch=spec("causal_bag"), arch_kwargs={"vocab": VOCAB}, dataset=spec("ragged_tokens"),
                    dataset_kwargs={"vocab": VOCAB, "n": 24}, out=str(out), mode="full", dtype="float32", quiet=True))
    student = TokenStudent(VOCAB)
    trainer(max_epochs=1).fit(student, datamodule=CacheDataModule(out, RaggedTokens(n=24, vocab=VOCAB), batch_size=6))
    assert len(student.steps) == 4
    for step in student.steps:
        ids, _, target = step["batch"]
        s_rows, t_rows, next_ids = [], [], []
        for b, length in enumerate(target.lengths.tolist()):
            with torch.no_grad():
                t = teacher(ids[b : b + 1, :length])[0]  # the sequence alone, no padding
            s_rows.append(step["logits"][b, : length - 1])  # position t predicts ids[t + 1]
            t_rows.append(t[: length - 1])
            next_ids.append(ids[b, 1:length])
        expected = kd_reference(torch.cat(s_rows), torch.cat(t_rows), torch.cat(next_ids), 1.0, 0.9, 0.1)
        assert float(step["loss"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_lightning_leaves_the_cache_sampler_alone_and_sets_its_epoch(image_cache: Path) -> None:
    """What Lightning's DDP data connector decides, asked of it directly (one process, a DDP trainer not yet run)."""
    cache = open_cache(image_cache)
    wrapped = cache.wrap(random_images(n=64))
    ours = DataLoader(wrapped, batch_size=8, sampler=cache_sampler(cache, None, num_replicas=2, rank=1), collate_fn=collate)
    plain = DataLoader(wrapped, batch_size=8, sampler=cache.sampler(num_replicas=2, rank=1), collate_fn=collate)
    ddp = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False)  # built, not run: no process is started
    connector = ddp._data_connector
    assert not connector._requires_distributed_sampler(ours)
    assert connector._requires_distributed_sampler(plain)  # the bug: a plain cache sampler gets wrapped, split again
    from lightning.fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(ours, 4)
    assert ours.sampler.epoch == 4 and wrapped.epoch == 4  # forwarded to the wrapped dataset: the views' epoch
    assert len(ours.sampler) == 32 and len(list(ours.sampler)) == 32


class _Trainer:
    """The two attributes check_train_samplers reads, as a DDP trainer on rank 0 of 2 has them."""

    def __init__(self, loader: DataLoader, world: int = 2, rank: int = 0) -> None:
        self.train_dataloader = loader
        self.distributed_sampler_kwargs = {"num_replicas": world, "rank": rank}


def test_a_sampler_split_twice_or_for_another_world_is_refused_with_the_fix(image_cache: Path) -> None:
    cache = open_cache(image_cache)
    wrapped = cache.wrap(random_images(n=64))
    twice = DistributedSamplerWrapper(cache.sampler(num_replicas=2, rank=0), num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(UsageError, match=r"already splits the data over 2 ranks.*1/2 of its share.*CacheDataModule"):
        check_train_samplers(_Trainer(DataLoader(wrapped, batch_size=8, sampler=twice, collate_fn=collate)))
    early = cache.sampler()  # built before the processes started: split for one process
    with pytest.raises(UsageError, match=r"split for rank 0 of 1, but this process is rank 1 of 2.*use_distributed_sampler=False"):
        check_train_samplers(_Trainer({"a": [DataLoader(wrapped, batch_size=8, sampler=early, collate_fn=collate)]}, rank=1))
    once = DistributedSamplerWrapper(cache.sampler(), num_replicas=2, rank=0, shuffle=False)  # correct, but not chunk-aware
    with pytest.warns(UserWarning, match="chunk-aware order is lost"):
        check_train_samplers(_Trainer(DataLoader(wrapped, batch_size=8, sampler=once, collate_fn=collate)))
    right = cache_sampler(cache, _Trainer(None, rank=1))
    assert (right.num_replicas, right.rank) == (2, 1) and isinstance(right, ChunkShuffleSampler)
    check_train_samplers(_Trainer(DataLoader(wrapped, batch_size=8, sampler=right, collate_fn=collate), rank=1))


def test_the_module_refuses_loader_options_it_sets(image_cache: Path) -> None:
    with pytest.raises(UsageError, match="sampler= is set by the module"):
        CacheDataModule(image_cache, random_images(n=64), batch_size=8, sampler=None)


# -- DDP: Lightning launches the two ranks itself ------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, views_cache: Path) -> Path:
    """One launch, two fits (lightning_factories.ddp_main): a plain cache.sampler(), then CacheDataModule."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "fit.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from lightning_factories import ddp_main
        ddp_main(sys.argv[1:])
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, str(script), str(views_cache), str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_ddp_serves_every_sample_once_per_epoch_and_rotates_views(ddp_run: Path) -> None:
    served = [json.loads((ddp_run / f"served-rank{r}.json").read_text()) for r in range(2)]
    views_by_epoch = {}
    for epoch in ("0", "1"):
        rows = np.array(served[0][epoch] + served[1][epoch])
        assert len(served[0][epoch]) == len(served[1][epoch]) == N // 2  # each rank its half, not a quarter
        samples, views = rows // VIEWS, rows % VIEWS
        assert sorted(samples.tolist()) == list(range(N))  # every sample exactly once across the ranks
        np.testing.assert_array_equal(views, default_view(int(epoch), samples, VIEWS))  # the epoch reached the dataset
        views_by_epoch[epoch] = dict(zip(samples.tolist(), views.tolist(), strict=True))
    assert all(views_by_epoch["0"][i] != views_by_epoch["1"][i] for i in range(N))
    np.testing.assert_array_equal(np.load(ddp_run / "weights-rank0.npy"), np.load(ddp_run / "weights-rank1.npy"))  # DDP averaged


@pytest.mark.slow
def test_ddp_with_a_plain_cache_sampler_is_refused_not_halved(ddp_run: Path) -> None:
    for rank in range(2):
        message = (ddp_run / f"error-rank{rank}.txt").read_text()
        assert message.startswith("UsageError") and "every rank would train on 1/2 of its share" in message
        assert "CacheDataModule" in message and "use_distributed_sampler=False" in message
