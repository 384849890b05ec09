"""What a Linux guest must avoid on hosts whose KVM emulates guest kernel mode.

On kvm_pvm (and any KVM without VT-x/AMD-V), guest CPL0 code runs in the host
kernel's instruction emulator, which gives up on SIMD (SSE and newer),
`clac`/`stac`, `lock cmpxchg16b` and `xrstor`. pyvmm completes such
instructions itself (completion.py), but each costs a trip through Python,
and the translator has no AVX, SSSE3 or SHA at all. Hiding the features keeps
the guest kernel on code paths the host can run.

Measured on this host (stock Debian 6.1 kernel):
- KVM_SET_CPUID2 clears cx16, pcid, rdpid and xsaves, but kvm_pvm keeps
  popcnt, smap, avx*, xsave, sse4_2 and most other bits set whatever we ask;
- completion alone gets the kernel to its initcalls, where blake2s's AVX-512
  code stops it (the translator has no AVX) after ~35,000 `clac` completions.
So what CPUID cannot hide is hidden with Linux's own `noxsave` and
`clearcpuid=` (X86_FEATURE bit numbers; 6.1 reads at most 31 characters)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Hidden through KVM_SET_CPUID2 (works on kvm_pvm).
CPUID_HIDE = ("cx16",)
# X86_FEATURE_* numbers (word * 32 + bit) Linux clears itself: smap, ssse3,
# sse4_1, sse4_2, popcnt, aes, pclmulqdq, sha_ni, and erms/fsrm so that
# clear_page/memset/memcpy use `rep stosq`/`movsq` (8x fewer iterations for
# the host's emulator than the byte forms, which topped the RIP profile).
# `noxsave` takes AVX* with it.
CLEARCPUID = (308, 137, 147, 148, 151, 153, 129, 317, 297, 580)
# cryptomgr.notests: the crypto self-tests (RSA among them) are hundreds of
# millions of emulated kernel instructions and test the host CPU, not pyvmm.
LINUX_PARAMS = "noxsave clearcpuid=" + ",".join(map(str, CLEARCPUID)) + " cryptomgr.notests"


def kernel_mode_emulated() -> bool:
    """True when this host's KVM runs guest kernel code in a software emulator
    (kvm_pvm loaded, or no vmx/svm flag in /proc/cpuinfo)."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not re.search(r"^flags\s*:.*\b(vmx|svm)\b", text, re.M)
