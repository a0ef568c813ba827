"""Imaging: decoding and viewer rendering of DICOM pixels (pure), reduced-resolution JPEG 2000."""
