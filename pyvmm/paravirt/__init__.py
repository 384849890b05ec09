"""pyvmm's paravirtual interface: the hypercall ABI (abi.py), the
engine-neutral dispatcher (hypervisor.py), the hypercall page contents
(hypercall_page.py) and the wiring into a machine (install.py).

docs/paravirt.md is the guest-facing description."""
