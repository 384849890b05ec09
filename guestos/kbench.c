/* Kernel-side nano-benchmarks (in, cr8 write, ptemod), run on request of
 * the user bench, and the command-line options that size the benchmarks. */
#include "kernel.h"

u64 opt_iters = 100000, opt_forks = 40000, opt_bench = 1, opt_mask = 0xFF;

static u64 parse_num(const char *s) {
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

static int starts(const char *s, const char *p) {
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}

/* "iters=N forks=N bench=0|1 mask=N" (benchmarks: bit i = user.c B_*) anywhere in the Multiboot command line. */
void parse_options(const char *s) {
    for (; *s; s++) {
        if (starts(s, "iters="))
            opt_iters = parse_num(s + 6);
        else if (starts(s, "forks="))
            opt_forks = parse_num(s + 6);
        else if (starts(s, "bench="))
            opt_bench = parse_num(s + 6);
        else if (starts(s, "mask="))
            opt_mask = parse_num(s + 5);
    }
}

u64 kbench(int kind, u64 n, u64 pml4) {
    u64 t0, t1;
    switch (kind) {
    case KB_IN:
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            (void)inb(0x80);
        t1 = rdtsc();
        return t1 - t0;
    case KB_CR8:
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            __asm__ volatile("mov %0, %%cr8" :: "r"(0UL) : "memory");
        t1 = rdtsc();
        return t1 - t0;
    case KB_PTEMOD: {
        /* HEAP_BASE's PTE flips between two frames: change + flush, n times
         * (pv_update_va: a store and invlpg natively, one hypercall under
         * pyvmm's ABI 1.1). */
        u64 *pte = as_pte(pml4, HEAP_BASE, 1);
        if (*pte & PTE_P)
            return 0;
        u64 fa = frame_alloc(), fb = frame_alloc();
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++)
            pv_update_va(pte, ((i & 1) ? fb : fa) | PTE_P | PTE_W | PTE_U, HEAP_BASE);
        t1 = rdtsc();
        pv_update_va(pte, 0, HEAP_BASE);
        frame_free(fa);
        frame_free(fb);
        return t1 - t0;
    }
    }
    return 0;
}
