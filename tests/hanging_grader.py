"""A per-item grader that really hangs (blocks without returning), for the grading pool's kill path."""

import time

from tip.grading import grade_one


def hang_on_marker(completion, reference, grader, timeout_s):
    if "HANG" in completion:
        time.sleep(3600)
    return grade_one(completion, reference, grader, timeout_s)


