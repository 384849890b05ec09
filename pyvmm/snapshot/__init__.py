"""Whole-VM snapshots: the VM state format (vmstate.py) and QEMU-style
internal snapshots on qcow2 drives (savevm.py)."""
