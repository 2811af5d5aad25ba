"""``DistillationTrainer`` (logit_cache.integrations.transformers): a Hugging Face Trainer on cached targets.

Against a hand-written loop over the same sampler, model init and optimiser (step for step, for a
per-token cache with a tiny GPT-2 and a per-sample cache with a tiny classifier), against the
teacher's own logits for the first loss, across a resume from a Trainer checkpoint, and under
2-process DDP (every sample once per epoch, each rank its own share, equal weights).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hf_factories as factories  # noqa: E402
from processes import torchrun_argv  # noqa: E402

from logit_cache import open_cache  # noqa: E402
from logit_cache.errors import UsageError  # noqa: E402
from logit_cache.integrations.transformers import TARGETS_KEY, DistillationCollator, DistillationTrainer  # noqa: E402
from logit_cache.losses import DistillationLoss, KLDivergence, TokenCrossEntropy, TokenKLDivergence, trained_positions  # noqa: E402

SEED = 3
LR = 0.1


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-trainer")
    return {"tokens": factories.dump_token_cache(root), "images": factories.dump_image_cache(root), "root": root}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def training_args(out: Path, **overrides: object) -> transformers.TrainingArguments:
    """CPU, no clipping, no schedule, no logging: what a plain SGD loop does."""
    settings = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "num_train_epochs": 2, "learning_rate": LR,
                "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "use_cpu": True, "report_to": "none", "save_strategy": "no",
                "logging_strategy": "no", "disable_tqdm": True, "seed": SEED}
    settings.update(overrides)
    return transformers.TrainingArguments(str(out), **settings)


class Recording(DistillationTrainer):
    """Records each micro-batch's loss as compute_loss returns it (a test's view; users never subclass)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.targets: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(float((result[0] if return_outputs else result).detach()))
            self.targets.append(inputs[TARGETS_KEY])
        return result


def trainer(model: torch.nn.Module, args: transformers.TrainingArguments, dataset: object, **kwargs: object) -> Recording:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return Recording(model, args, train_dataset=dataset, optimizers=(optimizer, None), **kwargs)


def expected_batches(cache, batch_size: int, epochs: int, **sampler_kwargs: object) -> list[list[int]]:
    """The cache's sampler order, epoch after epoch, cut into batches (what the Trainer must serve)."""
    sampler = cache.sampler(seed=SEED, **sampler_kwargs)
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = [int(i) for i in sampler.indices()]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


def own_loop(model: torch.nn.Module, cache, dataset, batch_size: int, accumulation: int, epochs: int, loss_fn, per_token: bool
             ) -> list[float]:
    """The hand-written loop: the cache's sampler, SGD, each batch's mean loss over ``accumulation`` batches per step."""
    sampler = cache.sampler(seed=SEED)
    loader = torch.utils.data.DataLoader(cache.wrap(dataset), batch_size=batch_size, sampler=sampler, collate_fn=cache.collate)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = list(loader)
        for first in range(0, len(batches), accumulation):
            group = batches[first : first + accumulation]
            for inputs, labels, target in group:
                if per_token:
                    logits = model(**inputs).logits
                    student, shifted, rows = trained_positions(logits, labels, target.lengths, target)
                    loss = loss_fn(student, shifted, rows)
                else:
                    loss = loss_fn(model(inputs["pixels"]), labels, target)
                (loss / len(group)).backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad()
    return losses


def rest_tail_kl(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """KL per row at T=1 over the teacher's top-k and one more bucket, the rest (``tail="rest"``), from the
    teacher's full logits (independent of the cache): ``sum_k p_k log(p_k / q_k) + p_r log(p_r / q_r)``."""
    ids = teacher.topk(k, dim=-1).indices
    p, q = teacher.softmax(-1).gather(1, ids), student.softmax(-1).gather(1, ids)
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    return (p * (p / q).log()).sum(-1) + p_rest * (p_rest / q_rest).log()


# -- single process: the Trainer equals our own loop ---------------------------------------------------------


def test_per_token_trainer_equals_own_loop_step_for_step(caches: dict[str, Path], tmp_path: Path) -> None:
    cache = open_cache(caches["tokens"])
    dataset = factories.served_tokens()
    start = factories.tiny_gpt2()
    reference = factories.initial_copy(start)

    # the first loss, from the teacher's own logits and the untrained student, each sequence alone (no padding)
    teacher = transformers.GPT2LMHeadModel.from_pretrained(caches["root"] / "teacher-gpt2", local_files_only=True).eval()
    first = expected_batches(cache, 4, 1)[0]
    with torch.no_grad():
        kl, ce = [], []
        for i in first:
            ids = dataset.seqs[i][None]
            s, t = start(ids).logits[0, :-1], teacher(ids).logits[0, :-1]
            kl.append(rest_tail_kl(s, t, k=8))
            ce.append(F.cross_entropy(s, ids[0, 1:], reduction="none"))
        independent = 0.9 * torch.cat(kl).mean() + 0.1 * torch.cat(ce).mean()

    run = trainer(start, training_args(tmp_path, gradient_accumulation_steps=2), cache.wrap(dataset))
    dataset.served.clear()  # the fingerprint check's reads are not training's
    run.train()
    loss_fn = DistillationLoss(TokenKLDivergence(1.0), 0.9, 0.1, ce_loss=TokenCrossEntropy())
    mine = own_loop(reference, cache, factories.served_tokens(), 4, 2, 2, loss_fn, per_token=True)

    assert dataset.served == expected_batches(cache, 4, 2)  # 9 batches per epoch, in the sampler's order for epochs 0 and 1
    assert len(run.losses) == len(mine) == 18
    np.testing.assert_allclose(run.losses, mine, rtol=1e-5, atol=1e-6)
    assert run.losses[0] == pytest.approx(float(independent), rel=1e-4)
    assert run.state.global_step == 10  # 5 steps an epoch: 2+2+2+2+1 batches
    for (name, a), b in zip(start.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_per_sample_trainer_equals_own_loop_and_drops_unused_columns(caches: dict[str, Path], tmp_path: Path) -> None:
    cache = open_cache(caches["images"])
    dataset = factories.served_images()
    start = factories.tiny_classifier()
    reference = factories.initial_copy(start)
    # the items carry {"pixels", "bias"}; TinyClassifier.forward takes pixels only: remove_unused_columns (default) drops bias
    run = trainer(start, training_args(tmp_path, per_device_train_batch_size=8), cache.wrap(dataset), temperature=2.0,
                  kd_loss_weight=0.7, org_loss_weight=0.3)
    dataset.served.clear()
    run.train()
    loss_fn = DistillationLoss(KLDivergence(2.0), 0.7, 0.3)
    mine = own_loop(reference, cache, factories.served_images(), 8, 1, 2, loss_fn, per_token=False)
    assert dataset.served == expected_batches(cache, 8, 2)
    np.testing.assert_allclose(run.losses, mine, rtol=1e-5, atol=1e-6)
    assert len(mine) == 10
    for a, b in zip(start.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # evaluation on a cached dataset: the mean of the batches' distillation losses (5 batches of 8, in index order)
    metrics = run.evaluate(eval_dataset=cache.wrap(factories.served_images()))
    loader = torch.utils.data.DataLoader(cache.wrap(factories.served_images()), batch_size=8, collate_fn=cache.collate)
    with torch.no_grad():
        expected = np.mean([float(loss_fn(reference(x["pixels"]), y, t)) for x, y, t in loader])
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_collator_keeps_the_forward_arguments_and_names_tensor_inputs(caches: dict[str, Path]) -> None:
    cache = open_cache(caches["images"])
    items = cache.wrap(factories.served_images()).__getitems__([3, 1])
    model = factories.tiny_classifier()
    batch = DistillationCollator.for_model(model)(items)
    assert set(batch) == {"pixels", "labels", TARGETS_KEY}
    torch.testing.assert_close(batch["pixels"], torch.stack([factories.served_images()[i][0]["pixels"] for i in (3, 1)]))
    assert batch["labels"].tolist() == [factories.served_images()[i][1] for i in (3, 1)]
    torch.testing.assert_close(batch[TARGETS_KEY].values, cache.targets([3, 1]).values)
    assert set(DistillationCollator.for_model(model, remove_unused_columns=False)(items)) == {"pixels", "bias", "labels", TARGETS_KEY}

    tokens = open_cache(caches["tokens"])
    batch = DistillationCollator.for_model(factories.tiny_gpt2())(tokens.wrap(factories.served_tokens()).__getitems__([0, 5]))
    assert set(batch) == {"input_ids", "attention_mask", "labels", TARGETS_KEY}
    lengths = [len(factories.served_tokens().seqs[i]) for i in (0, 5)]
    assert batch[TARGETS_KEY].lengths.tolist() == lengths == batch["attention_mask"].sum(1).tolist()

    class Other(torch.nn.Module):
        def forward(self, image):
            return image

    with pytest.raises(UsageError, match=r"none of the batch's inputs \(bias, pixels\).*remove_unused_columns=False"):
        DistillationCollator.for_model(Other())(items)


def test_a_dataset_without_a_cache_is_refused_with_the_fix(caches: dict[str, Path], tmp_path: Path) -> None:
    model = factories.tiny_classifier()
    with pytest.raises(UsageError, match=r"train_dataset is a ServedImages.*train_dataset=cache.wrap\(dataset\)"):
        DistillationTrainer(model, training_args(tmp_path), train_dataset=factories.served_images())


def test_a_views_cache_serves_each_epochs_views(caches: dict[str, Path], tmp_path: Path) -> None:
    """Replayed views (dumped with views=2): epoch e trains on row i * 2 + default_view(e, i), so the epoch reached the data."""
    from data_factories import three_rng_images

    from logit_cache.replay import default_view

    cache = open_cache(factories.dump_views_cache(tmp_path))
    run = trainer(factories.tiny_classifier(), training_args(tmp_path / "out", per_device_train_batch_size=8, num_train_epochs=3),
                  cache.wrap(three_rng_images(n=factories.IMAGES)))  # tensor inputs: passed as the forward's first argument, pixels
    run.train()
    batches = expected_batches(cache, 8, 3)
    assert len(run.targets) == len(batches) == 15
    rows_by_epoch = []
    for step, (batch, served) in enumerate(zip(batches, run.targets, strict=True)):
        samples = np.asarray(batch)
        rows = samples * 2 + default_view(step // 5, samples, 2)
        torch.testing.assert_close(served.values, cache.targets(rows).values)
        torch.testing.assert_close(served.indices, cache.targets(rows).indices)
        rows_by_epoch.append(rows)
    first, second = (np.concatenate(rows_by_epoch[e * 5 : (e + 1) * 5]) for e in (0, 1))
    assert set(first.tolist()).isdisjoint(second.tolist())  # over two epochs each sample shows both its views


# -- resume from a Trainer checkpoint -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["images", "tokens"])
def test_resume_from_a_checkpoint_continues_the_order(caches: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """Batches of 4, 2 per step: 10 batches (images) or 9 (tokens) an epoch; the checkpoint is mid epoch 1."""
    cache = open_cache(caches[kind])
    make_data, make_model = ((factories.served_images, factories.tiny_classifier) if kind == "images"
                             else (factories.served_tokens, factories.tiny_gpt2))
    args = training_args(tmp_path / "run", gradient_accumulation_steps=2, save_strategy="steps", save_steps=7)
    whole_data = make_data()
    whole = trainer(make_model(), args, cache.wrap(whole_data))
    whole_data.served.clear()
    whole.train()
    per_epoch = len(expected_batches(cache, 4, 1))
    steps_per_epoch = (per_epoch + 1) // 2
    assert whole_data.served == expected_batches(cache, 4, 2)
    checkpoint = tmp_path / "run" / "checkpoint-7"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 7

    resumed_data = make_data()
    resumed = trainer(make_model(seed=9), training_args(tmp_path / "again", gradient_accumulation_steps=2), cache.wrap(resumed_data))
    resumed_data.served.clear()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    done = per_epoch + 2 * (7 - steps_per_epoch)  # batches before the checkpoint: epoch 0, then 2 a step
    assert resumed_data.served == whole_data.served[done:]  # the rest of epoch 1 in epoch 1's order, nothing else
    np.testing.assert_allclose(resumed.losses, whole.losses[done:], rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- 2-process DDP ------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import os, sys, json
sys.path.insert(0, {tests!r})
import torch, transformers
import hf_factories as factories
from logit_cache import open_cache
from logit_cache.integrations.transformers import DistillationTrainer

rank = int(os.environ["RANK"])
out = {out!r}
for kind, make_data, make_model, n in [("tokens", factories.served_tokens, factories.tiny_gpt2, factories.SEQUENCES),
                                       ("images", factories.served_images, factories.tiny_classifier, factories.IMAGES)]:
    cache = open_cache({caches!r}[kind])
    data = make_data()
    model = make_model()
    args = transformers.TrainingArguments(os.path.join(out, kind), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                          num_train_epochs=2, learning_rate=0.1, lr_scheduler_type="constant", use_cpu=True,
                                          report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                          seed={seed}, ddp_backend="gloo")
    run = DistillationTrainer(model, args, train_dataset=cache.wrap(data))
    data.served.clear()
    run.train()
    torch.save({{"served": data.served, "state": model.state_dict(), "steps": run.state.global_step}},
               os.path.join(out, f"{{kind}}.rank{{rank}}.pt"))
"""


@pytest.mark.slow
def test_ddp_gives_every_sample_once_per_epoch(caches: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), seed=SEED,
                                        caches={k: str(v) for k, v in caches.items() if k != "root"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = torchrun_argv(str(script))
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 180 s (a rank hangs?): {exc.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    for kind, n in (("tokens", factories.SEQUENCES), ("images", factories.IMAGES)):
        cache = open_cache(caches[kind])
        ranks = [torch.load(tmp_path / f"{kind}.rank{r}.pt", weights_only=False) for r in range(2)]
        per_rank = n // 2
        batches = -(-per_rank // 4)
        for r, result in enumerate(ranks):
            # each rank: its own contiguous share of the cache's order, epoch 0 then epoch 1, batches of 4
            assert result["served"] == expected_batches(cache, 4, 2, num_replicas=2, rank=r), kind
            assert result["steps"] == 2 * -(-batches // 2)
        for epoch in range(2):
            seen = [i for result in ranks for batch in result["served"][epoch * batches : (epoch + 1) * batches] for i in batch]
            assert sorted(seen) == list(range(n)), (kind, epoch)  # every sample exactly once per epoch
        for name, value in ranks[0]["state"].items():  # DDP kept the replicas equal
            torch.testing.assert_close(value, ranks[1]["state"][name], msg=f"{kind}: {name}")
        assert not torch.equal(ranks[0]["state"][next(iter(ranks[0]["state"]))],
                               (factories.tiny_gpt2() if kind == "tokens" else factories.tiny_classifier()).state_dict()[
                                   next(iter(ranks[0]["state"]))])  # and it trained
