"""Outputs, built as values: the result record, the Secondary Capture and the ORU^R01."""
