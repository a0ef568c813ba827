"""Delivery: one outbox-driven sender policy; C-STORE (DICOM) and MLLP (HL7) attempts."""
