"""The study-level analysis: the only place a :class:`~gradbrain.data.Study` meets
features and the kernels.

* :mod:`~gradbrain.analysis.encoding` — encoding models of a study's fMRI and MEG
  responses (:func:`~gradbrain.analysis.encoding.fmri_encoding`,
  :func:`~gradbrain.analysis.encoding.meg_encoding`, variance partitions), returned as
  :class:`~gradbrain.analysis.encoding.Encoding` results that record what they were
  fitted on;
* :mod:`~gradbrain.analysis.backprop` — the backprop tests of one study
  (:func:`~gradbrain.analysis.backprop.backprop_tests`);
* :mod:`~gradbrain.analysis.simulation` — studies simulated from a model's own features
  and judged as a chapter judges a study (error rates, model-based nulls);
* :mod:`~gradbrain.analysis.chapter` — what a chapter starts from (its study, model and
  features).
"""
