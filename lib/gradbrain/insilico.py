"""In-silico experiments with fitted encoders (the user-facing names).

The code lives in the study-level analysis layer, :mod:`gradbrain.analysis.insilico`
(an encoder is fitted on a :class:`~gradbrain.data.Study`); this module gives its public
names one short home: ``gradbrain.insilico.fit_encoder(study, net)``.
"""

from .analysis.insilico import (MODALITIES, SIGNALS, Contrast, Encoder, contrast,
                                contrast_by_hierarchy, contrast_over_time, fit_encoder,
                                hierarchy_bins, phase_scramble, scramble, synthesize)

__all__ = ["Encoder", "fit_encoder", "scramble", "phase_scramble", "contrast", "Contrast",
           "contrast_by_hierarchy", "contrast_over_time", "hierarchy_bins", "synthesize",
           "SIGNALS", "MODALITIES"]
