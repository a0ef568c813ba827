"""The demo's PACS and HL7 receiver: peers of the node, not the node (tests and benchmarks use them too)."""
