"""DICOM ingestion: scan folders into stacks, assemble stacks into volumes.

``scan(root, salt=...)`` -> ScanResult(stacks, skipped);
``load_volume(stack)`` -> Volume (float32 (D, H, W), LPS affine, spacing mm);
``load_resampled(stack, shape)`` -> ResampledStack on the ``shape`` grid
(decoded slice by slice, no full-resolution volume; same values as
``load_volume`` + ``resample.resize``) or None when it declines the stack;
``metadata.record_from_dataset(ds, salt)`` -> the PHI-free record.
"""
from radnet_jax.dicom.errors import DicomError
from radnet_jax.dicom.scan import scan
from radnet_jax.dicom.types import ScanResult, Skipped, Stack, Volume
from radnet_jax.dicom.stream import ResampledStack, load_resampled
from radnet_jax.dicom.volume import load_volume

__all__ = ["DicomError", "ResampledStack", "ScanResult", "Skipped", "Stack",
           "Volume", "load_resampled", "load_volume", "scan"]
