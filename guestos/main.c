/* guestos kmain: console, pv-ops, CPU tables, memory, timer, then the init
 * process (user.c: self-tests and benchmarks); kernel-side nano-benchmarks
 * (in, cr8 write, ptemod) are here, run on request of the user bench. */
#include "kernel.h"

u64 opt_iters = 100000, opt_forks = 40000, opt_bench = 1, opt_mask = 0xFF;
u64 tsc_khz;

struct mbinfo { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

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
static void parse_cmdline(const char *s) {
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

static void calibrate(void) {
    u64 t = ticks;
    while (ticks == t)
        pv->safe_halt();
    u64 t0 = rdtsc(), start = ticks;
    while (ticks < start + 5)
        pv->safe_halt();
    tsc_khz = (rdtsc() - t0) / 50;
}

void kmain(u32 magic, u32 info) {
    uart_init();
    pvops_init();
    kprintf("guestos: boot magic=%x paravirt=%s\n", magic, pv->name);
    struct mbinfo *mb = (struct mbinfo *)(u64)info;
    u64 mem_end = 0x100000UL + (u64)mb->mem_upper * 1024;
    if (mb->flags & 4)
        parse_cmdline((const char *)(u64)mb->cmdline);
    cpu_init();
    pic_init();
    mm_init(mem_end);
    kprintf("guestos: mem=%luM iters=%lu forks=%lu bench=%lu\n", mem_end >> 20, opt_iters, opt_forks, opt_bench);
    pv->timer_start();
    calibrate();
    kprintf("guestos: tsc_khz=%lu\n", tsc_khz);
    proc_spawn_init();
    scheduler();
    extern u64 int80_via_ud;
    if (int80_via_ud)
        kprintf("guestos: %lu int 0x80 arrived as #UD\n", int80_via_ud);
    kprintf("guestos: ticks=%lu\n", ticks);
    pv_report();
    kprintf("guestos: done\n");
    pv->shutdown(0x10);
}
