"""CKA between stored feature arrays.

    math.py     the estimators (exact, unbiased, minibatch; linear and RBF), streamed from any array-like
    stage.py    `diffstore cka`: choose arrays from the store(s), check they cover the same samples, compute
    report.py   axis labels, the terminal table and the PNG heatmap
"""

from .math import CKAConfig, CKAResult, bias_floor, cka, cka_matrix

__all__ = ["CKAConfig", "CKAResult", "bias_floor", "cka", "cka_matrix"]
