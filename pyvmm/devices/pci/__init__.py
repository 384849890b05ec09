"""PCI: the host bridge (host.py), one function's config space (function.py)
and the ACPI description of the root bridge with its INTx routing (aml.py)."""
