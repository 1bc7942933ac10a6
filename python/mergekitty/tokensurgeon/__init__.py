"""Tokenizer transplant: a model with another model's (the donor's) tokenizer.

    from mergekitty.tokensurgeon import transplant
    result = transplant("my-model", "donor-model", "out/my-model-donor-vocab")

Donor tokens the model also has keep the model's rows (match.py); the others are approximated
from the tokens both share (approximate.py: orthogonal matching pursuit or k nearest
neighbours); the rest of the model is copied unchanged (run.py). See README "Tokenizer
transplant".
"""

from .run import MatrixReport, TokenSurgeonOptions, TransplantResult, transplant

__all__ = ["MatrixReport", "TokenSurgeonOptions", "TransplantResult", "transplant"]
