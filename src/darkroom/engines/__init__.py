"""Engines run one request: the local diffusers engine now, remote engines later (chosen by a routing policy)."""
