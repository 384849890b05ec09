"""virtio devices: split virtqueues (queue.py), the device-model base
(device.py), transports (transport/pci.py) and the devices (block.py, rng.py)."""
