"""CompressKV: semantic-retrieval-head token selection with error-aware layer budgets.

``method.py`` is the method (what ``kvbench run --method compresskv`` builds), the budget allocation and the
loaders of calibrations (kvbench artifacts and the official repository's score files); ``calibrate.py`` makes
a calibration for one model (``kvbench calibrate compresskv``).
"""
from kvbench.methods.compresskv.method import (CompressKV, CompressKVError, allocate_layer_budgets,
                                               read_official_head_ranking, read_official_layer_scores)

__all__ = ["CompressKV", "CompressKVError", "allocate_layer_budgets", "read_official_head_ranking",
           "read_official_layer_scores"]
