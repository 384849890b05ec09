"""virtio transports: pci.py (modern virtio-pci)."""
