"""dicom-node: a DICOM worker node for one-class anomaly detection on brain MRI and chest X-ray."""

__version__ = "0.1.0"
