"""Train a small teacher on the built-in digits data and save it as a state_dict checkpoint.

Gives new users a ``teacher.pt`` to try ``logit-cache dump`` on (arch
``logit_cache.tools.models:digits_mlp``). Deterministic given --seed; about three seconds on two CPU cores.
``logit-cache demo`` does this too, then the rest of the pipeline.

    python scripts/train_digits_teacher.py --out data/digits-teacher.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from logit_cache.tools import train_digits_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/digits-teacher.pt"), help="where to save the state_dict")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (40 reach ~99%% test accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    args = parser.parse_args()
    started = time.perf_counter()
    accuracy = train_digits_teacher(args.out, args.epochs, args.seed)
    print(f"saved {args.out} (arch logit_cache.tools.models:digits_mlp): test accuracy {accuracy:.3f}, "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
