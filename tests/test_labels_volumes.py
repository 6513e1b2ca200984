"""Labels of the volumes that scan splits out of multi-volume series: b0 and
b>0 diffusion volumes, DCE phases (sequence and contrast before/after the
bolus), fMRI/perfusion time points; paper vs extended taxonomy."""
import pytest

from radnet_jax.labels import OTHER, label

# A Philips-style b0 volume: spin-echo EPI tags whose TE alone reads as T2.
B0 = dict(Modality="MR", ScanningSequence="SE", EchoTime=80.0,
          RepetitionTime=4000.0, DiffusionBValue=0.0,
          SeriesBValues=[0.0, 1000.0], NumberOfVolumes=4, VolumeIndex=0,
          VolumeSplitBy="DiffusionBValue+DiffusionGradientOrientation")
DCE = dict(Modality="MR", ScanningSequence="GR", SequenceVariant=["SP"],
           EchoTime=1.8, RepetitionTime=4.5, NumberOfVolumes=4,
           VolumeSplitBy="TemporalPositionIdentifier",
           ContrastBolusAgent="GADAVIST")


def test_b0_volume_is_dwi_not_t2():
  ext = label(B0, "extended")["sequence"]
  assert ext.value == "DWI" and "b0 volume" in ext.provenance
  paper = label(B0, "paper")["sequence"]
  assert paper.value == OTHER and "not in the 'paper' taxonomy" in paper.provenance
  # The same tags without the series context: the weighting rule decides.
  alone = {k: v for k, v in B0.items() if k != "SeriesBValues"}
  assert label(alone, "extended")["sequence"].value == "T2"


def test_canon_b0_without_b_value_is_dwi():
  rec = dict(B0)
  del rec["DiffusionBValue"]
  assert label(rec, "extended")["sequence"].value == "DWI"


@pytest.mark.parametrize("image_type, cls", [
    ("DERIVED\\PRIMARY\\DIFFUSION\\ADC", "ADC"),
    ("DERIVED\\PRIMARY\\DIFFUSION\\TRACEW", "DWI")])
def test_adc_and_trace_volumes(image_type, cls):
  rec = dict(B0, ImageType=image_type, DiffusionBValue=1000.0)
  assert label(rec, "extended")["sequence"].value == cls


@pytest.mark.parametrize("index, after_bolus, contrast", [
    (0, -5.0, "no"), (1, 15.0, "yes"), (2, 35.0, "yes"), (1, 4.0, None)])
def test_dce_phase_sequence_and_contrast(index, after_bolus, contrast):
  rec = dict(DCE, VolumeIndex=index, VolumeTimeAfterBolusS=after_bolus)
  ext = label(rec, "extended")
  assert ext["sequence"].value == "T1"
  assert f"DCE time point {index + 1}/4" in ext["sequence"].provenance
  assert ext["contrast"].value == contrast
  if contrast is None:
    assert "before the bolus surely arrives" in ext["contrast"].provenance
  paper = label(rec, "paper")["sequence"]
  assert not paper.known and "dynamic series" in paper.provenance


def test_dce_phase_without_timing_falls_back_to_series_tags():
  rec = dict(DCE, VolumeIndex=0)
  assert label(rec, "extended")["contrast"].value == "yes"


def test_epi_time_points_are_other_from_tags():
  rec = dict(Modality="MR", ScanningSequence=["EP", "GR"], EchoTime=30.0,
             RepetitionTime=2000.0, NumberOfVolumes=5, VolumeIndex=2,
             VolumeSplitBy="InstanceNumber order")
  for tax in ("paper", "extended"):
    seq = label(rec, tax)["sequence"]
    assert seq.value == OTHER and "EPI time point 3/5" in seq.provenance


def test_multi_echo_volumes_are_not_time_points():
  rec = dict(Modality="MR", ScanningSequence="SE", EchoTime=90.0,
             RepetitionTime=3000.0, NumberOfVolumes=2, VolumeIndex=1,
             VolumeSplitBy="EchoNumbers+EchoTime")
  assert label(rec, "paper")["sequence"].value == "T2"


@pytest.mark.parametrize("directionality, cls", [
    ("DIRECTIONAL", "DWI"), ("ISOTROPIC", "DWI"), ("NONE", "T2")])
def test_diffusion_directionality(directionality, cls):
  rec = dict(Modality="MR", ScanningSequence="SE", EchoTime=80.0,
             RepetitionTime=4000.0, DiffusionDirectionality=directionality)
  assert label(rec, "extended")["sequence"].value == cls
