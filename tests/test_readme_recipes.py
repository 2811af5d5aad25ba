"""The README's recipes for training at scale, run exactly as written (the code blocks are read from README.md).

Each recipe runs in a folder holding ``caches/digits-top5`` (a top-5 cache of the digits train split,
dumped from a seeded teacher), and each test checks what the recipe promises: the student trains
(its loss falls below the untrained student's), under two ranks every sample is served once per
epoch, and only the files the README names are written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_teacher
from processes import free_port, torchrun_argv

from logit_cache import DumpConfig, dump_cache

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.slow  # each starts processes (torchrun, Lightning's ranks, transformers' import)
TIMEOUT = 300


def recipe(name: str) -> str:
    """The fenced block right after ``<!-- recipe: NAME -->`` in the README."""
    match = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.S)
    assert match, f"README.md has no recipe {name!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    torch.save(make_teacher().state_dict(), root / "teacher.pt")
    dump_cache(DumpConfig(teacher=str(root / "teacher.pt"), arch="logit_cache.models:digits_mlp", arch_kwargs={"hidden": 32},
                          dataset="digits", k=5, out=str(root / "caches" / "digits-top5"), device="cpu", quiet=True))
    return root


def run(argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(extra_env or {})}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# A probe appended to the Python recipes (after the recipe's own code, which is untouched): the samples
# each rank's loader served, and the loss of the trained and of a fresh student on the training data.
PROBE = '''
import json as _json, os as _os
import torch as _torch
from logit_cache import open_cache as _open
from logit_cache.data import DigitsDataset as _Digits
from logit_cache.tools.models import digits_mlp as _mlp
_ds = _Digits("train")
_x = _torch.stack([_ds[i][0] for i in range(len(_ds))]); _y = _torch.tensor([_ds[i][1] for i in range(len(_ds))])
_torch.manual_seed(123)
_fresh = _torch.nn.functional.cross_entropy(_mlp(hidden=16, depth=1)(_x), _y).item()
_trained = _torch.nn.functional.cross_entropy(TRAINED(_x), _y).item()
_served = sorted(int(i) for i in SAMPLER.indices())  # this rank's share of the epoch's order
_rank = SAMPLER.rank  # Lightning's ranks have no RANK variable
open(f"probe-{_rank}.json", "w").write(_json.dumps({"fresh": _fresh, "trained": _trained, "served": _served}))
'''


def probes(cwd: Path, ranks: int) -> list[dict]:
    """The probes the last run wrote, removed once read (the recipes share the folder)."""
    found = [json.loads((cwd / f"probe-{r}.json").read_text()) for r in range(ranks)]
    for stale in cwd.glob("probe-*.json"):
        stale.unlink()
    return found


def check_trained_and_covered(found: list[dict], samples: int) -> None:
    """The student learned, and the ranks' shares cover every sample, once but for the padding of an odd count."""
    for probe in found:
        assert probe["trained"] < 0.8 * probe["fresh"], probe  # it learned (a fresh student is near log 10)
    served = sorted(i for probe in found for i in probe["served"])
    padding = -samples % len(found)
    assert sorted(set(served)) == list(range(samples)) and len(served) == samples + padding, "every sample once per epoch"


def test_own_loop_recipe_single_and_under_torchrun(workdir: Path):
    code = recipe("own-loop")
    script = workdir / "kd_loop.py"
    script.write_text(code + "\nTRAINED, SAMPLER = student, sampler\n" + PROBE)
    run([sys.executable, str(script)], workdir)
    check_trained_and_covered(probes(workdir, 1), 1437)
    run(torchrun_argv(str(script)), workdir)
    found = probes(workdir, 2)
    check_trained_and_covered(found, 1437)  # 1437 is odd: the order's first sample is served twice
    assert len(found[0]["served"]) == len(found[1]["served"]) == 719


def test_cli_torchrun_recipe(workdir: Path):
    command = recipe("cli-torchrun").replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["torchrun", "--nproc_per_node=2"]
    done = run(torchrun_argv(*argv[2:]), workdir)
    sidecar = json.loads((workdir / "students" / "kd.json").read_text())
    assert sidecar["world_size"] == 2 and sidecar["global_batch_size"] == 64
    metrics = json.loads((workdir / "students" / "kd.metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert sorted(p.name for p in (workdir / "students").iterdir()) == ["kd.json", "kd.metrics.json", "kd.pt"]
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports


def test_hf_trainer_recipe(workdir: Path):
    script = workdir / "kd_trainer.py"
    script.write_text(recipe("hf-trainer") + "\nTRAINED, SAMPLER = trainer.model, trainer.train_sampler()\n" + PROBE)
    run([sys.executable, str(script)], workdir)
    check_trained_and_covered(probes(workdir, 1), 1437)
    assert sorted(p.name for p in (workdir / "trainer-out").iterdir() if p.name.startswith("checkpoint-"))  # save_strategy="epoch"


def test_lightning_recipe(workdir: Path):
    code = recipe("lightning")
    script = workdir / "kd_lightning.py"
    # the probe runs inside the recipe's __main__ block, after its fit, on every rank Lightning started
    sampler = "data.train_dataloader().sampler"  # the rank's CacheSampler, split as the trainer splits data
    probe = "\n".join("    " + line for line in [f"TRAINED, SAMPLER = student, {sampler}", *PROBE.strip().splitlines()])
    script.write_text(code + "\n" + probe + "\n")
    run([sys.executable, str(script)], workdir)
    check_trained_and_covered(probes(workdir, 2), 1437)
