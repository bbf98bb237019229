"""DICOM AI gateway: watch gateway drop folders, run a model per study, write and send DICOM."""

__version__ = "0.1.0"
