"""Diffusion objectives (DDPM ε with learned Σ, v-prediction, rectified flow) and sampling
through diffusers schedulers with classifier-free guidance."""

from ditx.diffusion.objectives import (
    SCHEDULERS,
    DDPMObjective,
    Objective,
    RectifiedFlowObjective,
    VPredictionObjective,
)
from ditx.diffusion.sampling import apply_guidance, class_errors, sample

__all__ = [
    "SCHEDULERS",
    "Objective",
    "DDPMObjective",
    "VPredictionObjective",
    "RectifiedFlowObjective",
    "apply_guidance",
    "class_errors",
    "sample",
]
