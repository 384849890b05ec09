"""The host CPU's own CPUID answers, read with the real instruction (so on
kvm_pvm too they are the CPU's, not a hypervisor's): `--cpu-model host`
offers what the host has, and leaf 0xD.1 follows the host's XSAVE forms.
Raises ConfigError where no executable page can be made for it."""

from __future__ import annotations

import ctypes
import functools
import mmap

from ...errors import ConfigError

# cpuid leaf/sub-leaf in edi/esi, a 16-byte (eax, ebx, ecx, edx) buffer in rdx:
# mov r8,rdx; mov eax,edi; mov ecx,esi; push rbx; cpuid; mov [r8],eax;
# mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("4989d0" "89f8" "89f1" "53" "0fa2" "418900" "41895804" "41894808"
                            "4189500c" "5b" "c3")


@functools.lru_cache(maxsize=1)
def _native_cpuid():
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as e:      # a host that forbids writable+executable memory
        raise ConfigError(f"--cpu-model host: cannot run the CPUID instruction here: {e.strerror}") from None
    page.write(_CPUID_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(addr)
    fn._page = page                   # keeps the code mapped as long as the function lives
    return fn


def host_cpuid(leaf: int, sub: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of the real CPUID instruction on this host.
    Raises ConfigError where no executable page can be made for it."""
    out = (ctypes.c_uint32 * 4)()
    _native_cpuid()(leaf, sub, ctypes.addressof(out))
    return out[0], out[1], out[2], out[3]
