"""Distillation losses: WSLD (fused op or reference PyTorch) and Hinton KD.

``wsld_ce_loss`` is what the trainer calls every step; ``wsld_loss`` / ``WSLDLoss`` give the WSLD
term alone (equal to mmrazor's ``WSLD``). See ``fastkd/losses/wsld.py`` for the math.
"""

from fastkd.losses.wsld import (
    LossTerms,
    WSLDLoss,
    WSLDRows,
    describe_impl,
    fused_available,
    kd_loss,
    wsld_ce_loss,
    wsld_ce_terms,
    wsld_loss,
)

__all__ = [
    "LossTerms",
    "WSLDLoss",
    "WSLDRows",
    "describe_impl",
    "fused_available",
    "kd_loss",
    "wsld_ce_loss",
    "wsld_ce_terms",
    "wsld_loss",
]
