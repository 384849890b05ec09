"""The AVX2 row of bench/bt_mips.py: one C loop compiled with
`gcc -O2 -march=x86-64-v3` (vectorised: vfmadd, vpsrad, vpaddd on YMM
registers), run natively and as a raw bt guest in the same run.

The guest enables the AVX state itself (CR4.OSXSAVE, XSETBV XCR0=7), then
calls the compiled function on arrays in guest memory; the function's
bytes are the same object code the native program calls.  Both sides run
the same number of repetitions, so their times compare directly."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

KERNEL_C = r"""
#define N 1024
void kernel(float *restrict a, const float *restrict b, const float *restrict c,
            int *restrict d, const int *restrict e, long reps)
{
    for (long r = 0; r < reps; r++)
        for (int i = 0; i < N; i++) {
            a[i] = a[i] * b[i] + c[i];
            d[i] = (d[i] >> 1) + e[i];
        }
}
"""

MAIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
void kernel(float *, const float *, const float *, int *, const int *, long);
int main(int argc, char **argv)
{
    long reps = atol(argv[1]);
    static float a[1024] __attribute__((aligned(32))), b[1024] __attribute__((aligned(32))),
                 c[1024] __attribute__((aligned(32)));
    static int d[1024] __attribute__((aligned(32))), e[1024] __attribute__((aligned(32)));
    for (int i = 0; i < 1024; i++) { a[i] = 1; b[i] = 0.5f; c[i] = i; d[i] = i; e[i] = 3; }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    kernel(a, b, c, d, e, reps);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.9f %f %d\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9, a[5], d[7]);
    return 0;
}
"""
CFLAGS = ["-O2", "-march=x86-64-v3", "-fno-pic", "-ffreestanding"]


def build(workdir: str) -> tuple[bytes, str]:
    """(the kernel's flat object code, the native program's path).

    Raises subprocess.CalledProcessError when gcc or objcopy fails."""
    d = Path(workdir)
    (d / "k.c").write_text(KERNEL_C)
    (d / "main.c").write_text(MAIN_C)
    subprocess.run(["gcc", *CFLAGS, "-c", "k.c", "-o", "k.o"], cwd=d, check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "k.o", "k.bin"], cwd=d, check=True)
    subprocess.run(["gcc", "-O2", "main.c", "k.o", "-o", "native"], cwd=d, check=True)
    return (d / "k.bin").read_bytes(), str(d / "native")


def guest_source(kernel: bytes, data: int, reps: int) -> str:
    """AT&T source of the raw guest: AVX state on, arrays set, one call."""
    body = ",".join(str(b) for b in kernel)
    return f"""
 mov %cr4, %rax
 or $0x40600, %rax
 mov %rax, %cr4
 xor %ecx, %ecx
 mov $7, %eax
 xor %edx, %edx
 xsetbv
 mov ${data:#x}, %rdi
 lea 0x1000(%rdi), %rsi
 lea 0x2000(%rdi), %rdx
 lea 0x3000(%rdi), %rcx
 lea 0x4000(%rdi), %r8
 mov ${reps}, %r9
 call 2f
 cli
 hlt
2:
 .byte {body}
"""


def run_native(program: str, reps: int) -> float:
    """Seconds the native program spends in the loop."""
    out = subprocess.run([program, str(reps)], check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="pyvmm-avx2-")
