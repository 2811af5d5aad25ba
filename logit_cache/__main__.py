"""``python -m logit_cache`` (and ``torchrun -m logit_cache``) runs the command line."""

from .cli import main

if __name__ == "__main__":
    main()
