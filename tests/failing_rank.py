"""`python tests/failing_rank.py <overrides>` under torchrun: tip.train, with rank 1 failing at its first step's
distillation (as an out-of-memory or a bad batch would), while rank 0 goes on into the step's collectives."""

import os
import sys

import tip.train

real_step = tip.train.opd_step


def failing_step(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return real_step(*args, **kwargs)


tip.train.opd_step = failing_step
if __name__ == "__main__":
    sys.argv[0] = "tip.train"
    tip.train.main()
