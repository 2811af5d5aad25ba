"""Teachers: loading them from checkpoints, exported programs and ``hf:`` directories, and running them."""
