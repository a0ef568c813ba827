"""The model audit (``cxr-lens audit``): the explain stages over a data set, and a report about the model."""
