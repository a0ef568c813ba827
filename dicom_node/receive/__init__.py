"""Receiving: the Storage SCP, its association policy (allowlists, TLS off the accept loop, PDU guard)."""
