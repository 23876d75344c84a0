"""Imaging steps: brain mask, N4 bias correction, resampling, normalisation, registration."""

from lesionwatch.pipelines.steps.bias_correction import correct_bias_field
from lesionwatch.pipelines.steps.brain_mask import (
    BrainMaskError,
    BrainMaskParameters,
    extract_brain_mask,
)
from lesionwatch.pipelines.steps.normalisation import NormalisationError, zscore_in_mask
from lesionwatch.pipelines.steps.registration import (
    RegistrationError,
    RegistrationKind,
    RegistrationResult,
    register,
)
from lesionwatch.pipelines.steps.resampling import (
    CANONICAL_DIRECTION,
    Grid,
    Interpolation,
    isotropic_grid,
    resample_to_grid,
)

__all__ = [
    "CANONICAL_DIRECTION",
    "BrainMaskError",
    "BrainMaskParameters",
    "Grid",
    "Interpolation",
    "NormalisationError",
    "RegistrationError",
    "RegistrationKind",
    "RegistrationResult",
    "correct_bias_field",
    "extract_brain_mask",
    "isotropic_grid",
    "register",
    "resample_to_grid",
    "zscore_in_mask",
]
