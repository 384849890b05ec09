/* guestos pv-ops: the privileged operations of the kernel, as a table of
 * function pointers chosen once at boot.  Native: the instructions
 * themselves.  pyvmm: hypercalls through the hypercall page (pyvmm's ABI,
 * docs/paravirt.md), found by the CPUID signature "PyVMMPyVMMPy" at
 * 0x40000000 + k*0x100. */
#include "kernel.h"

#define HV_OP_CONSOLE 1
#define HV_OP_SET_SHARED 2
#define HV_OP_IRQ_ENABLE 3
#define HV_OP_MMU_UPDATE 4
#define HV_OP_SET_CR3 5
#define HV_OP_FLUSH_TLB 6
#define HV_OP_TIMER 7
#define HV_OP_READ_TIME 8
#define HV_OP_HALT 9
#define HV_OP_SHUTDOWN 11
#define HV_OP_UPDATE_VA 12                 /* ABI 1.1, feature bit 6 */
#define HV_NOPS 13
#define HV_FEAT_UPDATE_VA 0x40
#define HV_FLUSH_ALL 0xFFFFFFFFUL
#define TICK_NS 10000000UL                 /* 100 Hz */
#define PV_TIMER_IRQ_DEFAULT 10

u8 pv_hcpage[4096] __attribute__((aligned(4096)));
static volatile u8 pv_shared[4096] __attribute__((aligned(4096)));
static struct { u64 ptr, val; } pv_batch[512] __attribute__((aligned(16)));
static int pv_nbatch;
static int pv_timer_irq = PV_TIMER_IRQ_DEFAULT;

static u64 hc_count[HV_NOPS];
i64 pv_uva_err;                            /* update_va results, or-ed (checked at the next CR3 load) */
u64 pv_uva_calls;

static inline i64 hcall(u64 op, u64 a0, u64 a1, u64 a2) {
    i64 r;
    hc_count[op]++;
    __asm__ volatile("call pv_hcpage" : "=a"(r) : "a"(op), "b"(a0), "c"(a1), "S"(a2) : "memory", "cc");
    return r;
}

/* The update_va entries (pv_update_va's register convention, kernel.h):
 * native - the store and invlpg; ABI 1.0 pyvmm - mmu_update + flush_tlb
 * through C, with the registers C may clobber saved.  Under ABI 1.1 the
 * table holds pv_hcpage itself. */
void n_update_va(void);
void n_set_pte_now(void);
void p_update_va_10(void);
void p_update_va_10_c(u64 *p, u64 v, u64 va);
__asm__(".text\n"
        "n_update_va:\n"
        "    mov %rcx, (%rbx)\n"
        "    invlpg (%rsi)\n"
        "    xor %eax, %eax\n"
        "    ret\n"
        "n_set_pte_now:\n"
        "    mov %rcx, (%rbx)\n"
        "    xor %eax, %eax\n"
        "    ret\n"
        "p_update_va_10:\n"
        "    push %rcx; push %rdx; push %rsi; push %rdi; push %r8; push %r9; push %r10; push %r11\n"
        "    mov %rsi, %rdx\n"
        "    mov %rcx, %rsi\n"
        "    mov %rbx, %rdi\n"
        "    call p_update_va_10_c\n"
        "    pop %r11; pop %r10; pop %r9; pop %r8; pop %rdi; pop %rsi; pop %rdx; pop %rcx\n"
        "    xor %eax, %eax\n"
        "    ret\n");

/* ----------------------------------------------------------------- native */
static void n_nop(void) {}
static void n_cli(void) { __asm__ volatile("cli" ::: "memory"); }
static void n_sti(void) { __asm__ volatile("sti" ::: "memory"); }
static int n_irqs_enabled(void) { u64 f; __asm__ volatile("pushfq; popq %0" : "=r"(f)); return (f >> 9) & 1; }
static void n_safe_halt(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }
static void n_set_pte(u64 *p, u64 v) { *(volatile u64 *)p = v; }
static void n_load_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" :: "r"(v) : "memory"); }
static void n_flush_one(u64 va) { __asm__ volatile("invlpg (%0)" :: "r"(va) : "memory"); }
static void n_flush_all(void) { u64 v; __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(v) :: "memory"); }
static void n_timer_start(void) {
    outb(0x43, 0x34);                      /* channel 0, lo/hi, rate generator */
    outb(0x40, 11932 & 0xFF);
    outb(0x40, 11932 >> 8);
    pic_unmask(0);
}
static void n_timer_tick(void) { pic_eoi(0); }
static u64 n_time_ns(void) { return ticks * TICK_NS; }
static void n_shutdown(int status) {
    outl(0xf4, (u32)status);               /* isa-debug-exit: exit code (status << 1) | 1 */
    for (;;) __asm__ volatile("cli; hlt");
}

static struct pv_ops native_ops = {
    "native", n_nop, n_nop, n_cli, n_sti, n_irqs_enabled, n_safe_halt,
    n_set_pte, n_set_pte, n_nop, n_load_cr3, n_flush_one, (void *)n_update_va, (void *)n_set_pte_now, n_flush_all,
    n_timer_start, n_timer_tick, n_time_ns, uart_write, n_shutdown, 32 + 0,
};

/* ------------------------------------------------------------------ pyvmm */
static void p_irq_disable(void) { pv_shared[0] = 0; }
static void p_irq_enable(void) {
    pv_shared[0] = 1;
    __asm__ volatile("" ::: "memory");
    if (pv_shared[1])
        hcall(HV_OP_IRQ_ENABLE, 0, 0, 0);
}
static int p_irqs_enabled(void) { return pv_shared[0]; }
static void p_safe_halt(void) {
    p_irq_enable();
    hcall(HV_OP_HALT, 0, 0, 0);
    p_irq_disable();
}
static void p_commit(void) {
    if (pv_nbatch) {
        if (hcall(HV_OP_MMU_UPDATE, (u64)pv_batch, pv_nbatch, 8) != pv_nbatch)
            panic("mmu_update refused");
        pv_nbatch = 0;
    }
}
static void p_queue_pte(u64 *p, u64 v) {
    if (pv_nbatch == 512)
        p_commit();
    pv_batch[pv_nbatch].ptr = (u64)p;
    pv_batch[pv_nbatch].val = v;
    pv_nbatch++;
}
static void p_set_pte(u64 *p, u64 v) {
    static struct { u64 ptr, val; } one __attribute__((aligned(16)));
    p_commit();                             /* keep the order of earlier queued writes */
    one.ptr = (u64)p;
    one.val = v;
    if (hcall(HV_OP_MMU_UPDATE, (u64)&one, 1, 8) != 1)
        panic("mmu_update refused");
}
static void p_load_cr3(u64 v) {
    p_commit();
    if (pv_uva_err)
        panic("update_va refused");
    hcall(HV_OP_SET_CR3, v, 0, 0);
}
static void p_flush_one(u64 va) { hcall(HV_OP_FLUSH_TLB, va, 0, 0); }
/* ABI 1.0 (no update_va): the two calls it replaces (va 0: no flush, set_pte_now). */
void p_update_va_10_c(u64 *p, u64 v, u64 va) {
    p_set_pte(p, v);
    if (va)
        p_flush_one(va);
}
static void p_flush_all(void) { hcall(HV_OP_FLUSH_TLB, HV_FLUSH_ALL, 0, 0); }
static u64 p_time_ns(void) { return hcall(HV_OP_READ_TIME, 0, 0, 0); }
static void p_arm(void) { hcall(HV_OP_TIMER, p_time_ns() + TICK_NS, 0, 0); }
static void p_timer_start(void) {
    pic_unmask(2);
    pic_unmask(pv_timer_irq);
    p_arm();
}
static void p_timer_tick(void) { p_arm(); pic_eoi(pv_timer_irq); }
static void p_console(const char *s, size_t n) { hcall(HV_OP_CONSOLE, (u64)s, n, 0); }
static void p_shutdown(int status) {
    hcall(HV_OP_SHUTDOWN, 0, (u64)status, 0);
    for (;;) __asm__ volatile("cli; hlt");
}

static struct pv_ops pyvmm_ops = {
    "pyvmm", p_irq_disable, p_irq_enable, p_irq_disable, p_irq_enable, p_irqs_enabled, p_safe_halt,
    p_set_pte, p_queue_pte, p_commit, p_load_cr3, p_flush_one, pv_hcpage, pv_hcpage, p_flush_all,
    p_timer_start, p_timer_tick, p_time_ns, p_console, p_shutdown, 32 + PV_TIMER_IRQ_DEFAULT,
};

struct pv_ops *pv = &native_ops;
static u32 pv_base;

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

int pv_detected(void) { return pv == &pyvmm_ops; }

/* Finds pyvmm's leaves; with them installs the hypercall page and the
 * shared page and switches the table to pyvmm_ops. */
void pvops_init(void) {
    u32 a, b, c, d;
    for (u32 base = 0x40000000; base < 0x40010000; base += 0x100) {
        cpuid(base, &a, &b, &c, &d);
        if (b == 0x4d567950 && c == 0x5679504d && d == 0x79504d4d && a >= base + 1) {
            pv_base = base;
            break;
        }
    }
    if (!pv_base)
        return;
    cpuid(pv_base + 1, &a, &b, &c, &d);
    if ((a >> 16) != 1 || (b & 0x3B) != 0x3B)
        return;                             /* another major version or a missing feature */
    if (!(b & 0x04)) {                      /* no MMU hypercalls offered: native page tables */
        pyvmm_ops.name = "pyvmm-mmu-native";
        pyvmm_ops.set_pte = n_set_pte;
        pyvmm_ops.queue_pte = n_set_pte;
        pyvmm_ops.commit_ptes = n_nop;
        pyvmm_ops.load_cr3 = n_load_cr3;
        pyvmm_ops.flush_one = n_flush_one;
        pyvmm_ops.update_va = (void *)n_update_va;
        pyvmm_ops.set_pte_now = (void *)n_set_pte_now;
        pyvmm_ops.flush_all = n_flush_all;
    } else if (!(b & HV_FEAT_UPDATE_VA) || (a & 0xFFFF) < 1) {
        pyvmm_ops.update_va = (void *)p_update_va_10;   /* an ABI 1.0 pyvmm */
        pyvmm_ops.set_pte_now = (void *)p_update_va_10;
    }
    pv_timer_irq = (int)d;
    pyvmm_ops.timer_vector = 32 + (int)d;
    wrmsr(c, (u64)pv_hcpage | 1);
    if (hcall(HV_OP_SET_SHARED, (u64)pv_shared, 0, 0) != 0)
        return;
    pv_shared[0] = 0;                       /* the kernel runs with interrupts off */
    pv = &pyvmm_ops;
}

/* "console=N mmu_update=N ..." for the hypercalls made so far (none: native). */
void pv_report(void) {
    static const char *names[HV_NOPS] = { "version", "console", "set_shared", "irq_enable", "mmu_update",
                                          "set_cr3", "flush_tlb", "timer", "read_time", "halt", "yield",
                                          "shutdown", "update_va" };
    if (!pv_detected())
        return;
    if (pyvmm_ops.update_va == pv_hcpage)      /* made straight from pv_update_va/pv_set_pte_now's call sites */
        hc_count[HV_OP_UPDATE_VA] = pv_uva_calls;
    kprintf("guestos: hypercalls");
    for (int i = 0; i < HV_NOPS; i++)
        if (hc_count[i])
            kprintf(" %s=%lu", names[i], hc_count[i]);
    kprintf("\n");
}
