/* guestos: shared kernel declarations. */
#ifndef GUESTOS_KERNEL_H
#define GUESTOS_KERNEL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define PAGE 4096UL
#define PTE_P 0x1UL
#define PTE_W 0x2UL
#define PTE_U 0x4UL
#define PTE_ADDR 0x000FFFFFFFFFF000UL

/* User address space (PML4[0] -> per-process PDPT; PDPT[0] is the shared
 * kernel identity map, PDPT[1] the process's own page directory). */
#define USER_BASE   0x40000000UL          /* user image (copied from the kernel) */
#define HEAP_BASE   0x40200000UL          /* demand-paged region: one page table */
#define HEAP_PAGES  512UL
#define STACK_TOP   0x40600000UL
#define STACK_PAGES 4UL

/* Syscalls: int 0x80, rax = number, rdi/rsi/rdx = arguments, rax = result. */
enum { SYS_EXIT, SYS_FORK, SYS_WAIT, SYS_WRITE, SYS_GETPID, SYS_NULL, SYS_SLEEP,
       SYS_REPORT, SYS_HEAPRESET, SYS_YIELD, SYS_KBENCH, SYS_ARG, SYS_COUNT };
enum { KB_IN, KB_CR8, KB_PTEMOD };       /* SYS_KBENCH kinds */
enum { ARG_ITERS, ARG_FORKS, ARG_BENCH, ARG_NPF, ARG_NDE, ARG_FRAMES, ARG_MASK };  /* SYS_ARG */

struct trapframe {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rdx, rcx, rbx, rax;
    u64 vector, err, rip, cs, rflags, rsp, ss;
};

/* The pv-ops table (pvops.c): native instructions or pyvmm hypercalls. */
struct pv_ops {
    const char *name;
    void (*trap_entry)(void);             /* kernel entered: interrupts off */
    void (*user_return)(void);            /* about to iretq to CPL3: interrupts on */
    void (*irq_disable)(void);
    void (*irq_enable)(void);
    int  (*irqs_enabled)(void);
    void (*safe_halt)(void);              /* enable, wait for an interrupt, disable */
    void (*set_pte)(u64 *ptep, u64 val);  /* one entry, immediately */
    void (*queue_pte)(u64 *ptep, u64 val);/* batched until commit_ptes */
    void (*commit_ptes)(void);
    void (*load_cr3)(u64 cr3);
    void (*flush_one)(u64 va);
    void *update_va;                      /* set_pte + flush_one(va) as one op: see pv_update_va */
    void *set_pte_now;                    /* set_pte with update_va's convention: see pv_set_pte_now */
    void (*flush_all)(void);
    void (*timer_start)(void);
    void (*timer_tick)(void);             /* in the tick handler: re-arm, EOI */
    u64  (*time_ns)(void);
    void (*console_write)(const char *s, size_t n);
    void (*shutdown)(int status);
    int timer_vector;
};
extern struct pv_ops *pv;
extern i64 pv_uva_err;
extern u64 pv_uva_calls;

/* *ptep = val, then drop va's TLB entry (nothing may be queued with
 * queue_pte).  pv->update_va is called with the hypercall page's register
 * convention - RAX = 12, RBX = ptep, RCX = val, RSI = va, RDI = 1 (invlpg),
 * result in RAX, every other register preserved - so under pyvmm the table
 * points straight at the hypercall page (no wrapper), as Linux's callee-save
 * pv-ops do.  Failures are or-ed into pv_uva_err (checked at the next CR3
 * load) rather than tested here, so the call site has no branch. */
static inline void pv_update_va(u64 *ptep, u64 val, u64 va) {
    i64 r;
    pv_uva_calls++;
    __asm__ volatile("call *%[fn]" : "=a"(r) : [fn] "m"(pv->update_va), "a"(12UL), "b"(ptep), "c"(val), "S"(va),
                     "D"(1UL) : "memory", "cc");
    pv_uva_err |= r;
}
/* *ptep = val with no flush (a not-present entry made present), through
 * pv->set_pte_now with pv_update_va's convention (RSI = 0, RDI = 0: no
 * invlpg): one hypercall under pyvmm, a store natively. */
static inline void pv_set_pte_now(u64 *ptep, u64 val) {
    i64 r;
    pv_uva_calls++;
    __asm__ volatile("call *%[fn]" : "=a"(r) : [fn] "m"(pv->set_pte_now), "a"(12UL), "b"(ptep), "c"(val), "S"(0UL),
                     "D"(0UL) : "memory", "cc");
    pv_uva_err |= r;
}
void pvops_init(void);
int pv_detected(void);
void pv_report(void);

/* console.c */
void kprintf(const char *fmt, ...);
void uart_init(void);
void uart_write(const char *s, size_t n);
void panic(const char *msg) __attribute__((noreturn));

/* cpu.c */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }
static inline u64 rdmsr(u32 msr) { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr)); return (u64)hi << 32 | lo; }
static inline void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory"); }
void cpu_init(void);
void pic_init(void);
void pic_eoi(int irq);
void pic_unmask(int irq);
void tss_set_rsp0(u64 rsp0);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

/* mm.c */
extern u64 kernel_pml4[512], kernel_pdpt[512], kernel_pd[512];
void mm_init(u64 mem_end);
u64 frame_alloc(void);                    /* zeroed; panics when memory is out */
void frame_free(u64 pa);
u64 frames_free(void);
u64 as_create(void);                      /* new address space: the user image mapped */
u64 as_copy(u64 pml4);                    /* fork: an eager copy */
void as_destroy(u64 pml4);
u64 *as_pte(u64 pml4, u64 va, int create);
int as_fault(u64 pml4, u64 va);           /* demand paging: 1 handled */
void as_heap_reset(u64 pml4);

/* proc.c */
struct proc;
extern struct proc *current;
extern volatile u64 ticks;
extern u64 tsc_khz;
void proc_init(void);
int proc_spawn_init(void);
void scheduler(void);
void trap(struct trapframe *tf);
void trap_leave(struct trapframe *tf);
i64 syscall(struct trapframe *tf);
void kill_current(int status);
void yield(void);
void timer_interrupt(void);

/* kbench.c */
u64 kbench(int kind, u64 n, u64 pml4);
void parse_options(const char *cmdline);
extern u64 opt_iters, opt_forks, opt_bench, opt_mask;

#endif
