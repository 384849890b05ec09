"""The kernel configuration fitted to pyvmm's virtual hardware, as data.

Each group names the symbols (without the CONFIG_ prefix) one piece of
pyvmm's machine needs; `FITTED` joins them.  The fragment is applied on top
of the kernel's own `tinyconfig` with allnoconfig semantics, so every symbol
not named here that has a prompt stays off — "nothing else".

`FORBIDDEN` lists symbols whose presence would mean hardware pyvmm does not
emulate crept in (or loadable modules when none were asked for); they are
checked after `olddefconfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# value "y", "m", "n" or a literal (int/string symbols)
Fragment = dict[str, str]

CORE: Fragment = {
    "64BIT": "y",
    "SMP": "y",
    "NR_CPUS": "64",               # pyvmm's --cpus limit (tinyconfig leaves 1, clamped to 2)
    "PRINTK": "y",
    "EARLY_PRINTK": "y",
    "BINFMT_ELF": "y",
    "BINFMT_SCRIPT": "y",          # #!/bin/busybox sh in /init
    "BLK_DEV_INITRD": "y",
    "RD_GZIP": "y",                # pyvmm's initramfs is gzip
    "KERNEL_LZ4": "y",             # fastest payload for pyvmm's host decompression
    "PROC_FS": "y",
    "PROC_SYSCTL": "y",            # /proc/sys (vm.drop_caches, net.*): tinyconfig's EXPERT leaves it out
    "POSIX_TIMERS": "y",           # alarm() and setitimer(): busybox ping paces its echoes with them
    "SYSFS": "y",
    "DEVTMPFS": "y",
    "DEVTMPFS_MOUNT": "y",
    "TTY": "y",
}

# The legacy board: COM1-4, the 8042 (keyboard and its reset line), CMOS RTC.
# PIT, PIC, local APIC and IOAPIC are always built on x86_64.
LEGACY: Fragment = {
    "SERIAL_8250": "y",
    "SERIAL_8250_CONSOLE": "y",
    "INPUT": "y",
    "INPUT_KEYBOARD": "y",
    "KEYBOARD_ATKBD": "y",
    "SERIO": "y",
    "SERIO_I8042": "y",
    "RTC_CLASS": "y",
    "RTC_DRV_CMOS": "y",
}

# Power off and SMP discovery through pyvmm's ACPI tables (RSDP..FADT, DSDT
# with _S5_, PM timer at 0x608, PM1a control at 0x604).  MPPARSE keeps the
# MP table path working too.
#
# PCI is here only for ACPI: Linux 6.1's ACPICA installs a default handler
# for the PCI_Config address space before it loads the DSDT, and with
# CONFIG_PCI=n that install fails (AE_BAD_PARAMETER, "During Region
# initialization"), so no DSDT, no \_S5_ and no ACPI power off.  pyvmm has
# no PCI host bridge: the kernel's probe of port 0xCF8 finds nothing and
# no PCI driver is built.
ACPI: Fragment = {
    "ACPI": "y",
    "PCI": "y",
    "X86_MPPARSE": "y",
}

# KVM paravirtual features pyvmm's hw engine offers: kvm-clock, PV EOI,
# steal time; and the PVH entry point pyvmm can load directly.
PARAVIRT: Fragment = {
    "HYPERVISOR_GUEST": "y",
    "PARAVIRT": "y",
    "KVM_GUEST": "y",
    "PVH": "y",
}

# virtio over PCI (pyvmm's default transport: MSI-X per queue) and over
# virtio-mmio devices declared on the kernel command line
# (virtio_mmio.device=<size>@<base>:<irq>), and the drivers pyvmm offers.
VIRTIO: Fragment = {
    "VIRTIO_MENU": "y",
    "PCI_MSI": "y",
    "VIRTIO_PCI": "y",
    "VIRTIO_MMIO": "y",
    "VIRTIO_MMIO_CMDLINE_DEVICES": "y",
    "BLOCK": "y",
    "BLK_DEV": "y",
    "VIRTIO_BLK": "y",
    "NET": "y",                    # virtio-net needs the network core...
    "INET": "y",                   # ...and IPv4 to be of any use
    "NETDEVICES": "y",
    "NET_CORE": "y",
    "VIRTIO_NET": "y",
    "VIRTIO_CONSOLE": "y",
    "HW_RANDOM": "y",
    "HW_RANDOM_VIRTIO": "y",
}

# A shorter boot on pyvmm's CPUs.  They have RDRAND/RDSEED (bt: rng.py;
# hw: the host's), so the CRNG is seeded from the CPU at boot instead of
# from jitter entropy; and the crypto library's boot-time self-tests are
# off (BLAKE2s's alone was 6% of a fitted boot's host time under bt).  The
# self-test switch lives in the crypto menu, hence CRYPTO.  HZ=100: under
# bt a timer tick costs ~4k guest instructions of timekeeping and load
# tracking, and guest time is host time; 250 ticks a second were ~12% of a
# fitted boot's instructions with the host clock.
#
# -O2 instead of tinyconfig's -Os: under bt every call and return ends a
# translated block and `rep` string forms go through a helper, both of
# which -Os favours; with SPARSEMEM_VMEMMAP, pfn_to_page() and back are
# arithmetic instead of two-level section lookups.  Measured, one vCPU,
# 256 MiB, --deterministic, warm block store, instructions to the marker:
# -Os 33.3 M; + VMEMMAP 30.2 M (7.6 -> 7.3 s); + -O2 24.8 M (5.4 s),
# with 11% fewer blocks to translate, for an image of 2.35 instead of 1.99 MiB.
BOOT: Fragment = {
    "RANDOM_TRUST_CPU": "y",
    "CRYPTO": "y",
    "CRYPTO_MANAGER_DISABLE_TESTS": "y",
    "HZ_100": "y",
    "CC_OPTIMIZE_FOR_PERFORMANCE": "y",
    "SPARSEMEM_VMEMMAP": "y",
}

GROUPS: dict[str, Fragment] = {
    "core": CORE,
    "legacy": LEGACY,
    "acpi": ACPI,
    "paravirt": PARAVIRT,
    "virtio": VIRTIO,
    "boot": BOOT,
}

FITTED: Fragment = {k: v for group in GROUPS.values() for k, v in group.items()}

# Present after olddefconfig = a mistake (hardware pyvmm lacks, or bloat).
FORBIDDEN: tuple[str, ...] = (
    "MODULES", "DRM", "FB", "VGA_CONSOLE", "SOUND", "USB", "USB_SUPPORT",
    "WLAN", "WIRELESS", "IPV6", "EFI", "SCSI", "ATA", "MD", "HID",
)


def normalize_symbol(name: str) -> str:
    """"CONFIG_FOO", "config_foo" or "FOO" -> "FOO".

    Raises ValueError for something that cannot be a Kconfig symbol."""
    sym = name.strip()
    if sym.upper().startswith("CONFIG_"):
        sym = sym[len("CONFIG_"):]
    sym = sym.upper()
    if not sym or not all(c.isalnum() or c == "_" for c in sym):
        raise ValueError(f"not a kernel config symbol: {name!r}")
    return sym


@dataclass
class FragmentRequest:
    """The fitted fragment with a user's --enable/--disable/--module edits."""
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    module: list[str] = field(default_factory=list)

    def symbols(self) -> Fragment:
        """The requested value of every symbol the fragment sets.
        Raises ValueError for a malformed symbol name."""
        want = dict(FITTED)
        for name in self.enable:
            want[normalize_symbol(name)] = "y"
        for name in self.module:
            want[normalize_symbol(name)] = "m"
        if self.module:
            want["MODULES"] = "y"      # =m means nothing without module support
        for name in self.disable:
            want[normalize_symbol(name)] = "n"
        return want

    def forbidden(self) -> tuple[str, ...]:
        """FORBIDDEN less whatever the user asked for explicitly."""
        asked = {k for k, v in self.symbols().items() if v != "n"}
        return tuple(s for s in FORBIDDEN if s not in asked)


def render(fragment: Fragment) -> str:
    """The fragment in .config syntax (what merge_config.sh reads)."""
    lines = ["# pyvmm: kernel fitted to pyvmm's virtual hardware"]
    for sym, value in fragment.items():
        if value == "n":
            lines.append(f"# CONFIG_{sym} is not set")
        else:
            lines.append(f"CONFIG_{sym}={value}")
    return "\n".join(lines) + "\n"
