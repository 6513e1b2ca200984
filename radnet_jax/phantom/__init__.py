"""Synthetic DICOM corpus (digital phantom) with ground truth, and the LiTS-layout set.

``make_corpus`` writes a realistic multi-patient DICOM archive (CT, MR T1/T2/
T1-FLAIR/T2-FLAIR, PET) with header noise and ``truth.csv``; ``make_lits``
writes liver/tumour segmentation volumes in the LiTS layout; ``make_layouts``
writes multi-volume DWI/fMRI/perfusion/DCE series in vendors' storage layouts.
"""
from radnet_jax.phantom.corpus import make_corpus
from radnet_jax.phantom.layouts import make_layouts
from radnet_jax.phantom.lits import make_lits
from radnet_jax.phantom.noise import HeaderNoise
from radnet_jax.phantom.truth import load_truth

__all__ = ["make_corpus", "make_layouts", "make_lits", "HeaderNoise", "load_truth"]
