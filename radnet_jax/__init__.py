"""RadNet-JAX: self-supervised-by-metadata pretraining of 3D CNNs on DICOM."""
__version__ = "0.1.0"
