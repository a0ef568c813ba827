"""Processing: the worker, the processor (one image's stages) and the eligibility rules."""
