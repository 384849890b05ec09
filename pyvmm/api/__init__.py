"""The control plane: a closed set of commands (commands.py) and the
protocols that carry them (qmp.py: the QEMU Machine Protocol)."""
