"""The training validation's cases and scores, from :mod:`synthtools.evaluation`.

The recipes import from :mod:`synthtools.evaluation` directly; these names stay
here for training runs started before the evaluation layer moved (a running
recipe looks them up at each validation)."""
from synthtools.evaluation import (CONSISTENCY_SETS, REG_CASES, SEG_CASES, STRIP_CASES, data_root,  # noqa: F401
                                   score_consistency, score_reg, score_seg, score_strip)
