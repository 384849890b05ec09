"""Networking: the NetPort protocol a NIC model talks to (port.py), the
host TAP backend (tap.py), and the `pyvmm switch` pieces (switch*.py)."""
