/* guestos kmain: console, pv-ops, CPU tables, memory, timer, then the init
 * process (user.c: self-tests and benchmarks); the kernel-side
 * nano-benchmarks and the command-line options are in kbench.c. */
#include "kernel.h"

u64 tsc_khz;

struct mbinfo { u32 flags, mem_lower, mem_upper, boot_device, cmdline; };

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
        parse_options((const char *)(u64)mb->cmdline);
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
