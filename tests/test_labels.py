"""Label rules on real-world header values (Siemens / GE / Philips naming)."""
import math

import pydicom
import pytest
from pydicom.data import get_testdata_file

from radnet_jax.labels import OTHER, TASKS, label
from radnet_jax.labels.coverage import refine_by_extent
from radnet_jax.labels.fields import Fields, to_floats, to_multi
from radnet_jax.labels.taxonomy import Taxonomy

AX = [1, 0, 0, 0, 1, 0]
COR = [1, 0, 0, 0, 0, -1]
SAG = [0, 1, 0, 0, 0, -1]

# (record, expected sequence, provenance prefix)
SEQUENCE_CASES = [
    (dict(Modality="MR", SeriesDescription="Ax T2 FRFSE"), "T2", "desc:"),
    (dict(Modality="MR", SeriesDescription="t2_tse_tra", ScanningSequence="SE",
          SequenceName="*tse2d1_15", EchoTime=101, RepetitionTime=4500), "T2", "tag:"),
    (dict(Modality="MR", SeriesDescription="T2W_TSE"), "T2", "desc:"),
    (dict(Modality="MR", SeriesDescription="AX T1 POST GAD", ScanningSequence="SE",
          EchoTime="14", RepetitionTime="550"), "T1", "tag:"),
    (dict(Modality="MR", SeriesDescription="SAG T1 FLAIR", ScanningSequence=["SE", "IR"],
          EchoTime=24, RepetitionTime=2200, InversionTime=860), "T1-FLAIR", "tag:"),
    (dict(Modality="MR", SeriesDescription="SAG T1 FLAIR"), "T1-FLAIR", "desc:"),
    (dict(Modality="MR", SeriesDescription="t2_tirm_tra_dark-fluid",
          ScanningSequence="SE\\IR", SequenceName="*tir2d1_16", EchoTime=81,
          RepetitionTime=9000, InversionTime=2500), "T2-FLAIR", "tag:"),
    (dict(Modality="MR", SeriesDescription="AX FLAIR"), "T2-FLAIR", "desc:"),
    (dict(Modality="MR", ProtocolName="DARK FLUID tra"), "T2-FLAIR", "desc:ProtocolName"),
    (dict(Modality="MR", SeriesDescription="COR STIR", ScanningSequence="SE\\IR",
          EchoTime=60, RepetitionTime=5000, InversionTime=160), "T2", "tag:"),
    (dict(Modality="MR", SeriesDescription="t1_mprage_sag_p2_iso",
          ScanningSequence="GR\\IR", SequenceVariant="SK\\SP\\MP",
          SequenceName="*tfl3d1_16ns", EchoTime=2.98, RepetitionTime=2300,
          InversionTime=900), "T1", "tag:"),
    (dict(Modality="MR", SeriesDescription="Ax VIBRANT MPh +C", ScanningSequence="GR",
          EchoTime=2.1, RepetitionTime=4.5), "T1", "tag:"),
    (dict(Modality="MR", SeriesDescription="t1_vibe_fs_tra"), "T1", "desc:"),
    (dict(Modality="MR", SeriesDescription="HASTE cor"), "T2", "desc:"),
    (dict(Modality="MR", SeriesDescription="Ax SSFSE"), "T2", "desc:"),
    (dict(Modality="mr", SeriesDescription="  ax t1  "), "T1", "desc:"),
    # Tags win over a contradicting description (provenance says so).
    (dict(Modality="MR", SeriesDescription="T1 mislabelled", ScanningSequence="SE",
          EchoTime=110, RepetitionTime=5000), "T2", "tag:"),
    # Outside the taxonomy / not an acquisition of interest.
    (dict(Modality="MR", SeriesDescription="3 Plane Loc SSFSE"), OTHER, "desc:"),
    (dict(Modality="MR", SeriesDescription="TOF_3D_multi-slab", ScanningSequence="GR",
          EchoTime=3.6, RepetitionTime=22), OTHER, "desc:"),
    (dict(Modality="MR", SeriesDescription="ep2d_perf"), OTHER, "desc:"),
    (dict(Modality="MR", SeriesDescription="svs_se_30"), OTHER, "desc:"),
    (dict(Modality="MR", SeriesDescription="SWI_Images", ScanningSequence="GR",
          EchoTime=20), OTHER, "tag:ImageType" if False else "desc:"),
    (dict(Modality="MR", SeriesDescription="ep2d_diff_b1000", DiffusionBValue=1000),
     OTHER, "tag:DiffusionBValue"),          # DWI is extended-only
    (dict(Modality="MR", ImageType="DERIVED\\PRIMARY\\ADC\\ADC"), OTHER, "tag:ImageType"),
    (dict(Modality="CT", SeriesDescription="CHEST 1.25mm"), "CT", "modality:"),
    (dict(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), OTHER, "tag:ImageType"),
    (dict(Modality="CT", SeriesDescription="Topogram  0.6  T20s"), OTHER, "desc:"),
    (dict(Modality="PT", SeriesDescription="PET WB"), OTHER, "modality:"),
    (dict(Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.7"), OTHER, "tag:SOPClassUID"),
    (dict(Modality="SR"), OTHER, "modality:"),
    (dict(SOPClassUID="1.2.840.10008.5.1.4.1.1.2"), "CT", "tag:SOPClassUID"),
    (dict(Modality="MR", SeriesDescription="PJN"), None, "unknown:"),
    (dict(Modality="MR", SeriesDescription="T1 T2 combo"), None, "unknown:"),
    (dict(), None, "unknown:"),
]


@pytest.mark.parametrize("record,expected,prov", SEQUENCE_CASES)
def test_sequence_rules(record, expected, prov):
  lab = label(record)["sequence"]
  assert lab.value == expected, lab
  assert lab.provenance.startswith(prov), lab


EXTENDED_CASES = [
    (dict(Modality="MR", SeriesDescription="ep2d_diff_b1000", DiffusionBValue="1000"), "DWI"),
    (dict(Modality="MR", SeriesDescription="ACRIN-6698: ADC: from S4: bVals=0,100,600,800"), "ADC"),
    (dict(Modality="MR", SeriesDescription="DWI TRACE"), "DWI"),
    (dict(Modality="MR", ScanningSequence="SE", EchoTime=15, RepetitionTime=3000), "PD"),
    (dict(Modality="MR", SeriesDescription="PD_TSE_FS_cor"), "PD"),
    (dict(Modality="PT", SeriesDescription="PET AC"), "PT"),
]


@pytest.mark.parametrize("record,expected", EXTENDED_CASES)
def test_sequence_extended_taxonomy(record, expected):
  assert label(record, "extended")["sequence"].value == expected
  paper = label(record, "paper")["sequence"]
  assert paper.value == OTHER and "not in the 'paper' taxonomy" in paper.provenance


def test_tags_win_over_description_and_say_so():
  lab = label(dict(Modality="MR", SeriesDescription="Ax T1", ScanningSequence="SE",
                   EchoTime=100, RepetitionTime=5000))["sequence"]
  assert lab.value == "T2" and "tags win over desc:SeriesDescription" in lab.provenance


PLANE_CASES = [
    (dict(ImageOrientationPatient=AX), "AX", "iop:"),
    (dict(ImageOrientationPatient="1\\0\\0\\0\\0\\-1"), "COR", "iop:"),
    (dict(ImageOrientationPatient=[str(v) for v in SAG]), "SAG", "iop:"),
    # Oblique axial: 25 degrees about x; the nearest plane wins.
    (dict(ImageOrientationPatient=[1, 0, 0, 0, math.cos(0.436), -math.sin(0.436)]), "AX", "iop:"),
    # Double-oblique coronal (prostate-style angulation).
    (dict(ImageOrientationPatient=[0.98, 0.17, 0.0, 0.05, -0.3, -0.95]), "COR", "iop:"),
    # IOP wins over a contradicting description.
    (dict(ImageOrientationPatient=SAG, SeriesDescription="t2_tse_tra"), "SAG", "iop:"),
    (dict(SeriesDescription="t2_tse_tra"), "AX", "desc:"),
    (dict(SeriesDescription="Ax T2 FRFSE"), "AX", "desc:"),
    (dict(SeriesDescription="SAG T1 FLAIR"), "SAG", "desc:"),
    (dict(SeriesDescription="CORONAL"), "COR", "desc:"),
    (dict(ImageOrientationPatient=[0, 0, 0, 0, 0, 0], SeriesDescription="sag"), "SAG", "desc:"),
    (dict(SeriesDescription="3 plane"), None, "unknown:"),
    (dict(ImageOrientationPatient="garbage"), None, "unknown:invalid"),
]


@pytest.mark.parametrize("record,expected,prov", PLANE_CASES)
def test_plane_rules(record, expected, prov):
  lab = label({"Modality": "MR", **record})["plane"]
  assert lab.value == expected, lab
  assert lab.provenance.startswith(prov), lab


def test_oblique_provenance_gives_angle():
  lab = label(dict(Modality="MR", ImageOrientationPatient=[
      1, 0, 0, 0, math.cos(0.436), -math.sin(0.436)]))["plane"]
  assert "oblique 25 deg" in lab.provenance


CONTRAST_CASES = [
    (dict(Modality="CT", ContrastBolusAgent="OMNIPAQUE",
          SeriesDescription="CHEST W/O CONTRAST"), "yes", "tag:ContrastBolusAgent"),
    (dict(Modality="CT", SeriesDescription="CHEST W/O CONTRAST"), "no", "desc:"),
    (dict(Modality="MR", SeriesDescription="AX T1 POST GAD"), "yes", "desc:"),
    (dict(Modality="MR", SeriesDescription="T1 W/O"), "no", "desc:"),
    (dict(Modality="MR", SeriesDescription="AX T1 +C"), "yes", "desc:"),
    (dict(Modality="MR", SeriesDescription="Sag T2 FS Right+C"), "yes", "desc:"),
    (dict(Modality="CT", SeriesDescription="CT HEAD C+"), "yes", "desc:"),
    (dict(Modality="MR", SeriesDescription="ax t1 pre"), "no", "desc:"),
    (dict(Modality="CT", StudyDescription="CT CHEST WO IV CONT"), "no", "desc:StudyDescription"),
    (dict(Modality="CT", StudyDescription="CT ABD AND PELVIS WITH IV CONT"), "yes", "desc:"),
    (dict(Modality="CT", StudyDescription="CT_CHEST_ABDOMEN_PELVIS_W_CONTRAST"), "yes", "desc:"),
    (dict(Modality="CT", StudyDescription="CT THORAX W/O DYE"), "no", "desc:"),
    (dict(Modality="CT", SeriesDescription="Portal venous 3mm"), "yes", "desc:"),
    (dict(Modality="CT", SeriesDescription="ARTERIAL PHASE"), "yes", "desc:"),
    (dict(Modality="CT", StudyDescription="NONCONTRAST CT HEAD"), "no", "desc:"),
    (dict(Modality="CT", StudyDescription="PET-CT (Ganzkoerper primaer mit KM)"), "yes", "desc:"),
    (dict(Modality="CT", StudyDescription="CT HEAD POST OP"), None, "unknown:"),
    # Study-level W/WO is ambiguous; the series level decides.
    (dict(Modality="MR", StudyDescription="MRI BRAIN W/WO CONTRAST"), None, "unknown:"),
    (dict(Modality="MR", StudyDescription="MRI BRAIN W/WO CONTRAST",
          SeriesDescription="AX T1 POST"), "yes", "desc:SeriesDescription"),
    (dict(Modality="MR", StudyDescription="MR PELVIS PRE AND POST",
          SeriesDescription="Ax T1 pre"), "no", "desc:SeriesDescription"),
    (dict(Modality="MR", SeriesDescription="T1 FL3D DYN FS PRE+5POST"), None, "unknown:"),
    (dict(Modality="CT", ContrastBolusAgent="NONE"), "no", "tag:"),
    (dict(Modality="CT", ContrastBolusVolume="80"), "yes", "tag:ContrastBolusVolume"),
    (dict(Modality="CT", ContrastBolusAgent="ORAL", ContrastBolusRoute="ORAL"), None, "unknown:"),
    (dict(Modality="MR", ContrastBolusAgent="11 ml Omniscan"), "yes", "tag:"),
    (dict(Modality="MR", SeriesDescription="t2_tse_tra"), None, "unknown:"),
    # "Enhanced" as the DICOM IOD (nibabel's Philips MPRAGE) is not contrast;
    # "enhanced CT" still is.
    (dict(Modality="MR", StudyDescription="R3.2.2 Enhanced Dicom Phantom",
          SeriesDescription="MPRAGE_S2"), None, "unknown:"),
    (dict(Modality="MR", SeriesDescription="Enhanced MR Image export"), None, "unknown:"),
    (dict(Modality="CT", StudyDescription="ENHANCED CT ABDOMEN"), "yes", "desc:"),
]


@pytest.mark.parametrize("record,expected,prov", CONTRAST_CASES)
def test_contrast_rules(record, expected, prov):
  lab = label(record)["contrast"]
  assert lab.value == expected, lab
  assert lab.provenance.startswith(prov), lab


def test_contrast_tags_win_and_say_so():
  lab = label(dict(Modality="CT", ContrastBolusAgent="OMNIPAQUE",
                   StudyDescription="CT CHEST W/O CONTRAST"))["contrast"]
  assert lab.value == "yes" and "tags win over desc:StudyDescription" in lab.provenance


COVERAGE_CASES = [
    (dict(BodyPartExamined="CHEST"), ("lung",)),
    (dict(BodyPartExamined="THORAX"), ("lung",)),
    (dict(BodyPartExamined="ABDOMEN"), ("liver", "kidney", "intestine")),
    (dict(BodyPartExamined="ABD"), ("liver", "kidney", "intestine")),
    (dict(BodyPartExamined="PANCREAS"), ("liver", "kidney")),
    (dict(BodyPartExamined="ABDOMENPELVIS"), ("liver", "kidney", "intestine", "pelvis")),
    (dict(BodyPartExamined="HEAD_NECK"), ("head", "neck")),
    (dict(BodyPartExamined="HEADNECK"), ("head", "neck")),
    (dict(BodyPartExamined="CHEST_ABDOMEN_PELVIS"),
     ("lung", "liver", "kidney", "intestine", "pelvis")),
    (dict(BodyPartExamined="CAP"), ("lung", "liver", "kidney", "intestine", "pelvis")),
    (dict(BodyPartExamined="WHOLEBODY"), ("brain", "head", "neck", "lung", "breast",
                                          "liver", "kidney", "intestine", "pelvis")),
    (dict(BodyPartExamined="Whole Body"), ("brain", "head", "neck", "lung", "breast",
                                           "liver", "kidney", "intestine", "pelvis")),
    (dict(BodyPartExamined="BRAIN"), ("brain",)),
    (dict(BodyPartExamined="SKULL"), ("brain",)),
    (dict(BodyPartExamined="PROSTATE"), ("pelvis",)),
    (dict(BodyPartExamined="Left Breast"), ("breast",)),
    (dict(BodyPartExamined="CSPINE"), ("neck",)),
    (dict(BodyPartExamined="LIVER"), ("liver",)),
    (dict(BodyPartExamined="KIDNEY"), ("kidney",)),
    (dict(BodyPartExamined="COLON"), ("intestine",)),
    (dict(BodyPartExamined="KNEE"), ()),
    (dict(StudyDescription="CT CHEST ABD PELVIS W CONTRAST"),
     ("lung", "liver", "kidney", "intestine", "pelvis")),
    (dict(StudyDescription="MRI BRAIN W/WO"), ("brain",)),
    # run-together region words of Siemens-style CT series descriptions
    (dict(SeriesDescription="AbdPelvis 5.0 B30f"), ("liver", "kidney", "intestine", "pelvis")),
    (dict(SeriesDescription="Cor MPR AbdPelvis 3.0 I30f CE"), ("liver", "kidney", "intestine", "pelvis")),
    (dict(SeriesDescription="ThorAbdPel 2.0 Br40"), ("lung", "liver", "kidney", "intestine", "pelvis")),
    (dict(SeriesDescription="CT ABD/PEL W"), ("liver", "kidney", "intestine", "pelvis")),
    (dict(SeriesDescription="Abdomen 5.0 B30f"), ("liver", "kidney", "intestine")),
    (dict(StudyDescription="CT HEAD AND NECK"), ("head", "neck")),
    (dict(SeriesDescription="t2_tse_tra"), None),
    (dict(BodyPartExamined="PHANTOM"), None),
]


@pytest.mark.parametrize("record,expected", COVERAGE_CASES)
def test_coverage_rules(record, expected):
  lab = label({"Modality": "CT", **record})["coverage"]
  assert lab.value == expected, lab


@pytest.mark.parametrize("bands,extent,expected", [
    (("liver", "kidney", "intestine"), 40.0, ("liver",)),           # thin slab
    (("liver", "kidney", "intestine"), 380.0, ("liver", "kidney", "intestine")),
    (("liver", "kidney", "intestine", "pelvis"), 40.0, ("liver",)),
    (("lung",), 300.0, ("lung",)),
    (("lung",), 1000.0, ("brain", "head", "neck", "lung", "liver", "kidney",
                         "intestine", "pelvis")),
    (("brain",), 150.0, ("brain",)),
    (("pelvis",), 80.0, ("pelvis",)),
    (("breast",), 10.0, ("breast",)),
])
def test_coverage_extent_refinement(bands, extent, expected):
  assert refine_by_extent(bands, extent) == expected


def test_coverage_extent_from_record_and_provenance():
  lab = label(dict(Modality="CT", BodyPartExamined="ABDOMEN", ExtentSI=40.0))["coverage"]
  assert lab.value == ("liver",)
  assert lab.provenance.startswith("bpe:BodyPartExamined") and "ExtentSI=40mm" in lab.provenance
  # ExtentMM [D, H, W] of an axial stack: D runs along the body axis.
  lab = label(dict(Modality="CT", BodyPartExamined="CHEST", ImageOrientationPatient=AX,
                   ExtentMM=[1000.0, 350.0, 350.0]))["coverage"]
  assert "pelvis" in lab.value and "ExtentMM" in lab.provenance


@pytest.mark.parametrize("record,expected,prov", [
    (dict(SliceSpacing=2.5, SpacingBetweenSlices=3.0, SliceThickness=5.0), 2.5, "geom:SliceSpacing"),
    (dict(SpacingBetweenSlices="3.0", SliceThickness="5"), 3.0, "tag:SpacingBetweenSlices"),
    (dict(SliceThickness="1.25"), 1.25, "tag:SliceThickness"),
    (dict(SliceSpacing=float("nan"), SliceThickness=0.8), 0.8, "tag:SliceThickness"),
    (dict(SliceThickness="None"), None, "unknown:"),
])
def test_spacing_rules(record, expected, prov):
  lab = label({"Modality": "CT", **record})["spacing"]
  assert lab.value == expected and lab.provenance.startswith(prov)


def test_partial_record_gives_partial_labels():
  labels = label({"Modality": "MR", "SeriesDescription": "AX T1 POST GAD"})
  assert set(labels) == set(TASKS)
  assert labels["sequence"].value == "T1"
  assert labels["plane"].value == "AX"
  assert labels["contrast"].value == "yes"
  assert not labels["coverage"].known and labels["coverage"].provenance.startswith("unknown:")
  assert not labels["spacing"].known
  targets = Taxonomy("paper").encode(labels)
  assert targets["sequence"] == 1 and targets["coverage_mask"] == 0
  assert math.isnan(targets["spacing"])


def test_messy_values_are_tolerated():
  messy = {"modality": " mr ", "SeriesDescription": None, "ProtocolName": float("nan"),
           "ScanningSequence": "['SE', 'IR']", "EchoTime": "120.0",
           "RepetitionTime": "9000", "InversionTime": "2500",
           "ImageOrientationPatient": "[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]",
           "BodyPartExamined": "head ", "SliceThickness": ""}
  labels = label(messy)
  assert labels["sequence"].value == "T2-FLAIR"
  assert labels["plane"].value == "AX"
  assert labels["coverage"].value == ("brain",)
  assert not labels["spacing"].known


def test_field_parsers():
  assert to_multi("ORIGINAL\\PRIMARY\\AXIAL") == ("ORIGINAL", "PRIMARY", "AXIAL")
  assert to_multi(["original", "primary"]) == ("ORIGINAL", "PRIMARY")
  assert to_floats("1\\0\\0\\0\\1\\0") == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
  assert to_floats("1\\x\\0") is None
  assert Fields({"EchoTime": "12.5"}).number("echotime") == 12.5


def test_non_image_objects_get_no_image_labels():
  labels = label({"Modality": "SEG", "BodyPartExamined": "LIVER"})
  assert labels["sequence"].value == OTHER
  assert all(not labels[t].known for t in ("plane", "contrast", "coverage", "spacing"))


def test_unknown_taxonomy_is_an_error():
  with pytest.raises(ValueError, match="unknown taxonomy"):
    label({"Modality": "CT"}, taxonomy="mine")


# --- real DICOM headers (pydicom's test files) -----------------------------------

def _record(ds) -> dict:
  try:
    from radnet_jax.dicom.metadata import record_from_dataset
    return record_from_dataset(ds, salt="test")
  except ImportError:   # reader not there yet: the plain keyword -> value dict
    out = {}
    for el in ds:
      if el.keyword and el.VR not in ("SQ", "OB", "OW", "UN"):
        v = el.value
        out[el.keyword] = ([x for x in v] if isinstance(v, pydicom.multival.MultiValue)
                           else v)
    return out


@pytest.mark.parametrize("name,expected", [
    # CT with ISOVUE in ContrastBolusAgent, axial IOP, 5 mm slices.
    ("CT_small.dcm", {"sequence": "CT", "plane": "AX", "contrast": "yes", "spacing": 5.0}),
    # SE, TE 240 ms, TR 4000 ms -> T2.
    ("MR_small.dcm", {"sequence": "T2", "plane": "AX"}),
    # Siemens VIBE (GR, TE 2.81 ms) with 11 ml Omniscan, BodyPartExamined ABDOMEN.
    ("MR-SIEMENS-DICOM-WithOverlays.dcm",
     {"sequence": "T1", "plane": "AX", "contrast": "yes",
      "coverage": ("liver", "kidney", "intestine")}),
    # Enhanced MR whose ImageType flavour says T1, BodyPartExamined HEAD.
    ("emri_small.dcm", {"sequence": "T1", "coverage": ("brain",)}),
    # NM secondary capture -> outside the taxonomy.
    ("JPEG2000.dcm", {"sequence": OTHER}),
])
def test_real_pydicom_headers(name, expected):
  path = get_testdata_file(name)
  if path is None:
    pytest.skip(f"{name} not shipped with this pydicom")
  labels = label(_record(pydicom.dcmread(path, stop_before_pixels=True)))
  for task, value in expected.items():
    assert labels[task].value == pytest.approx(value) if task == "spacing" \
        else labels[task].value == value, (task, labels[task])
