/* guestos processes: a fixed table, an xv6-style scheduler loop on the boot
 * stack, traps (exceptions, the timer, int 0x80 syscalls), fork/exit/wait. */
#include "kernel.h"

#define NPROC 16
#define KSTACK 8192
enum { UNUSED, RUNNABLE, RUNNING, WAITING, SLEEPING, ZOMBIE };

struct proc {
    int state, pid, parent, status;
    u64 pml4, ksp, wake;
    u8 kstack[KSTACK] __attribute__((aligned(16)));
};

extern void trapret(void);
extern void swtch(u64 *save, u64 rsp);

static struct proc procs[NPROC];
struct proc *current;
static u64 sched_rsp;
static int next_pid = 1;
volatile u64 ticks;
static u64 npf, nde;                        /* handled page faults, skipped #DE */
u64 int80_via_ud;                           /* syscalls that arrived as #UD */

static struct trapframe *tf_of(struct proc *p) {
    return (struct trapframe *)(p->kstack + KSTACK) - 1;
}

/* A fresh slot whose first switch lands in trapret with tf_of(p). */
static struct proc *proc_alloc(void) {
    for (int i = 0; i < NPROC; i++) {
        struct proc *p = &procs[i];
        if (p->state != UNUSED)
            continue;
        p->pid = next_pid++;
        p->parent = -1;
        u64 *sp = (u64 *)tf_of(p);
        *--sp = (u64)trapret;
        for (int k = 0; k < 6; k++)
            *--sp = 0;
        p->ksp = (u64)sp;
        return p;
    }
    return 0;
}

int proc_spawn_init(void) {
    struct proc *p = proc_alloc();
    struct trapframe *tf = tf_of(p);
    memset(tf, 0, sizeof(*tf));
    p->pml4 = as_create();
    tf->cs = 0x23;
    tf->ss = 0x1b;
    tf->rflags = 0x202;
    tf->rip = USER_BASE;                    /* user.c's entry is first in .user */
    tf->rsp = STACK_TOP - 16;
    p->state = RUNNABLE;
    return p->pid;
}

static void sched(void) { swtch(&current->ksp, sched_rsp); }

void yield(void) {
    current->state = RUNNABLE;
    sched();
}

static int live_procs(void) {
    int n = 0;
    for (int i = 0; i < NPROC; i++)
        n += procs[i].state != UNUSED;
    return n;
}

/* Runs processes until none is left. */
void scheduler(void) {
    int last = 0;
    while (live_procs()) {
        int ran = 0;
        for (int k = 1; k <= NPROC; k++) {
            struct proc *p = &procs[(last + k) % NPROC];
            if (p->state != RUNNABLE)
                continue;
            last = (int)(p - procs);
            current = p;
            p->state = RUNNING;
            tss_set_rsp0((u64)(p->kstack + KSTACK));
            pv->load_cr3(p->pml4);
            swtch(&sched_rsp, p->ksp);
            current = 0;
            ran = 1;
            break;
        }
        if (!ran)
            pv->safe_halt();
    }
    pv->load_cr3((u64)kernel_pml4);
}

void timer_interrupt(void) {
    ticks++;
    for (int i = 0; i < NPROC; i++)
        if (procs[i].state == SLEEPING && procs[i].wake <= ticks)
            procs[i].state = RUNNABLE;
    pv->timer_tick();
}

static void do_exit(int status) {
    struct proc *p = current;
    if (p->pid == 1)
        kprintf("guestos: init exited status=%d\n", status);
    pv->load_cr3((u64)kernel_pml4);
    as_destroy(p->pml4);
    p->pml4 = 0;
    p->status = status;
    for (int i = 0; i < NPROC; i++)          /* orphans are reaped by nobody: drop them */
        if (procs[i].parent == p - procs) {
            procs[i].parent = -1;
            if (procs[i].state == ZOMBIE)
                procs[i].state = UNUSED;
        }
    if (p->parent >= 0) {
        p->state = ZOMBIE;
        if (procs[p->parent].state == WAITING)
            procs[p->parent].state = RUNNABLE;
    } else {
        p->state = UNUSED;
    }
    sched();
    panic("zombie ran");
}

void kill_current(int status) { do_exit(status); }

static i64 do_fork(struct trapframe *tf) {
    struct proc *c = proc_alloc();
    if (!c)
        return -1;
    c->pml4 = as_copy(current->pml4);
    *tf_of(c) = *tf;
    tf_of(c)->rax = 0;
    c->parent = (int)(current - procs);
    c->state = RUNNABLE;
    return c->pid;
}

static i64 do_wait(int *status) {
    for (;;) {
        int kids = 0;
        for (int i = 0; i < NPROC; i++) {
            struct proc *c = &procs[i];
            if (c->parent != current - procs || c->state == UNUSED)
                continue;
            kids++;
            if (c->state == ZOMBIE) {
                if (status)
                    *status = c->status;
                c->state = UNUSED;
                c->parent = -1;
                return c->pid;
            }
        }
        if (!kids)
            return -1;
        current->state = WAITING;
        sched();
    }
}

static const char *bench_names[] = { "syscall", "in", "cr8wr", "call_ret", "pgfault",
                                     "divzero", "ptemod", "forkwait" };

i64 syscall(struct trapframe *tf) {
    switch (tf->rax) {
    case SYS_EXIT: do_exit((int)tf->rdi); return 0;
    case SYS_FORK: return do_fork(tf);
    case SYS_WAIT: return do_wait((int *)tf->rdi);
    case SYS_WRITE: {
        char buf[256];
        u64 n = tf->rsi < sizeof(buf) ? tf->rsi : sizeof(buf);
        memcpy(buf, (const void *)tf->rdi, n);
        pv->console_write(buf, n);
        return (i64)n;
    }
    case SYS_GETPID: return current->pid;
    case SYS_NULL: return 0;
    case SYS_SLEEP:
        current->wake = ticks + tf->rdi;
        current->state = SLEEPING;
        sched();
        return (i64)ticks;
    case SYS_REPORT:
        if (tf->rdi < sizeof(bench_names) / sizeof(bench_names[0]))
            kprintf("bench %s ops=%lu cycles=%lu per_op=%lu\n", bench_names[tf->rdi], tf->rdx, tf->rsi,
                    tf->rdx ? tf->rsi / tf->rdx : 0);
        return 0;
    case SYS_HEAPRESET: as_heap_reset(current->pml4); return 0;
    case SYS_YIELD: yield(); return 0;
    case SYS_KBENCH: return (i64)kbench((int)tf->rdi, tf->rsi, current->pml4);
    case SYS_ARG:
        switch (tf->rdi) {
        case ARG_ITERS: return (i64)opt_iters;
        case ARG_FORKS: return (i64)opt_forks;
        case ARG_BENCH: return (i64)opt_bench;
        case ARG_NPF: return (i64)npf;
        case ARG_NDE: return (i64)nde;
        case ARG_FRAMES: return (i64)frames_free();
        case ARG_MASK: return (i64)opt_mask;
        }
        return -1;
    }
    return -1;
}

/* #DE from user code: skip a register-operand div/idiv (optional REX, F6/F7, mod 3). */
static int skip_div(struct trapframe *tf) {
    const u8 *ip = (const u8 *)tf->rip;
    int n = 0;
    if ((ip[0] & 0xF0) == 0x40)
        n++;
    if ((ip[n] == 0xF6 || ip[n] == 0xF7) && (ip[n + 1] & 0xC0) == 0xC0 && ((ip[n + 1] >> 3) & 7) >= 6) {
        tf->rip += n + 2;
        return 1;
    }
    return 0;
}

void trap(struct trapframe *tf) {
    int user = (tf->cs & 3) == 3;
    pv->trap_entry();
    if (user && tf->rip < USER_BASE)        /* CPL3 at a kernel address: a VMM got iretq wrong */
        kprintf("guestos: user frame at kernel rip %lx (vector %lu)\n", tf->rip, tf->vector);
    if (tf->vector == 6 && user && *(const u16 *)tf->rip == 0x80CD) {
        /* Some hosts (kvm_pvm) raise #UD for int 0x80 from CPL3: finish it here. */
        tf->rip += 2;
        int80_via_ud++;
        tf->rax = (u64)syscall(tf);
    } else if (tf->vector == 0x80) {
        tf->rax = (u64)syscall(tf);
    } else if (tf->vector == (u64)pv->timer_vector) {
        timer_interrupt();
        if (user && current)
            yield();
    } else if (tf->vector == 14 && user) {
        u64 cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        if (as_fault(current->pml4, cr2)) {
            npf++;
        } else {
            kprintf("guestos: pid %d killed: page fault at %lx rip %lx err %lx\n", current->pid, cr2,
                    tf->rip, tf->err);
            do_exit(-14);
        }
    } else if (tf->vector == 0 && user && skip_div(tf)) {
        nde++;
    } else if (tf->vector >= 32 && tf->vector < 48) {
        pic_eoi((int)tf->vector - 32);      /* spurious or unused line */
    } else if (user) {
        kprintf("guestos: pid %d killed: trap %lu rip %lx\n", current->pid, tf->vector, tf->rip);
        do_exit(-(int)tf->vector - 100);
    } else {
        kprintf("guestos: trap %lu err %lx rip %lx\n", tf->vector, tf->err, tf->rip);
        panic("kernel trap");
    }
}

void trap_leave(struct trapframe *tf) {
    if ((tf->cs & 3) == 3)
        pv->user_return();
}
