"""The study-level analysis: the only place a :class:`~gradbrain.data.Study` meets
features and the kernels.

``encoding`` fits encoding models of a study's fMRI and MEG responses
(:func:`~gradbrain.analysis.encoding.fmri_encoding`,
:func:`~gradbrain.analysis.encoding.meg_encoding`, variance partitions).
"""
