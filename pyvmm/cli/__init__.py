"""The `pyvmm` command."""
