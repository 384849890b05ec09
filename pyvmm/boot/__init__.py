"""Putting a guest image into memory and choosing the vCPU's entry state."""
