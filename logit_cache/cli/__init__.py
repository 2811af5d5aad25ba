"""The ``logit-cache`` command line: parse, call the library, print. No logic of its own.

The ``main`` group lives here (the entry point ``logit_cache.cli:main``); the commands are grouped
by job: :mod:`.write` (dump, convert), :mod:`.inspect` (info, verify), :mod:`.root` (ls, rm, gc),
:mod:`.train` (train, demo); options several commands share are declared once in :mod:`.options`.
"""

from __future__ import annotations

import click

from .. import __version__
from .inspect import info_command, verify_command
from .root import gc_command, ls_command, rm_command
from .train import demo_command, train_command
from .write import convert_command, dump_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="logit-cache")
def main() -> None:
    """Run a teacher once, cache its logits, distill from the cache.

    \b
    Typical use:
      logit-cache demo                      # the whole pipeline on built-in data, about a minute
      logit-cache dump --teacher teacher.pt --arch logit_cache.models:digits_mlp \\
                       --dataset digits --out caches/digits-top5 --topk 5
      logit-cache info caches/digits-top5
      logit-cache train --student logit_cache.models:digits_mlp --student-kwargs '{"hidden": 16, "depth": 1}' \\
                        --dataset digits --cache caches/digits-top5 --out student.pt
    """



for _command in (dump_command, info_command, ls_command, rm_command, gc_command, train_command, demo_command, verify_command,
                 convert_command):
    main.add_command(_command)


if __name__ == "__main__":
    main()
