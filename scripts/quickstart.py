"""The main job end to end on the built-in default: train a digits teacher, dump its cache, show it.

    python scripts/quickstart.py [--workdir data]

Runs the real command line (``logit-cache dump`` and ``info``) as a user would. Safe to rerun:
it overwrites its own outputs in ``--workdir``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from train_digits_teacher import train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("data"), help="where the teacher and the cache go")
    args = parser.parse_args()
    teacher = args.workdir / "digits-teacher.pt"
    cache = args.workdir / "digits-top5"
    accuracy = train_teacher(teacher)
    print(f"trained {teacher}: digits test accuracy {accuracy:.3f}")
    cli = [sys.executable, "-m", "logit_cache"]
    dump = [*cli, "dump", "--teacher", str(teacher), "--arch", "logit_cache.models:digits_mlp",
            "--dataset", "digits", "--out", str(cache), "--topk", "5", "--overwrite"]
    print("$ " + " ".join(["logit-cache", *dump[3:]]), flush=True)
    subprocess.run(dump, check=True)
    print(f"$ logit-cache info {cache}", flush=True)
    subprocess.run([*cli, "info", str(cache)], check=True)


if __name__ == "__main__":
    main()
