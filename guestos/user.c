/* guestos user space (CPL3, linked at 0x40000000 and copied into every new
 * address space): the init process runs the self-tests, then the
 * nano-benchmarks of Adams & Agesen (ASPLOS 2006) and forkwait.
 * Only int 0x80 reaches the kernel; this file calls no kernel function. */
typedef unsigned long u64;
typedef long i64;

#define ARG_MASK 6
enum { SYS_EXIT, SYS_FORK, SYS_WAIT, SYS_WRITE, SYS_GETPID, SYS_NULL, SYS_SLEEP,
       SYS_REPORT, SYS_HEAPRESET, SYS_YIELD, SYS_KBENCH, SYS_ARG };
enum { KB_IN, KB_CR8, KB_PTEMOD };
enum { B_SYSCALL, B_IN, B_CR8, B_CALLRET, B_PGFAULT, B_DIVZERO, B_PTEMOD, B_FORKWAIT };
#define HEAP ((volatile u64 *)0x40200000UL)
#define HEAP_PAGES 512

static inline i64 sys(u64 n, u64 a, u64 b, u64 c) {
    i64 r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "memory");
    return r;
}
static inline u64 rdtsc(void) {
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static void write(const char *s) {
    u64 n = 0;
    while (s[n])
        n++;
    sys(SYS_WRITE, (u64)s, n, 0);
}

/* "selftest: <text><number>\n" in one write. */
static void say(const char *text, i64 v) {
    char b[128];
    int n = 0;
    for (const char *p = "selftest: "; *p; p++) b[n++] = *p;
    for (const char *p = text; *p && n < 100; p++) b[n++] = *p;
    char t[24];
    int k = 0;
    u64 u = v < 0 ? -(u64)v : (u64)v;
    do { t[k++] = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) b[n++] = '-';
    while (k) b[n++] = t[--k];
    b[n++] = '\n';
    b[n] = 0;
    write(b);
}

void user_main(void);
static int passed, failed;
static void check(int ok, const char *text, i64 v) {
    if (ok) passed++; else { failed++; write("selftest: FAILED "); }
    say(text, v);
}

static i64 fork(void) { return sys(SYS_FORK, 0, 0, 0); }
static void exit(int s) { sys(SYS_EXIT, (u64)s, 0, 0); for (;;) ; }
static i64 wait(int *st) { return sys(SYS_WAIT, (u64)st, 0, 0); }
static u64 arg(int k) { return (u64)sys(SYS_ARG, (u64)k, 0, 0); }
static void report(int b, u64 cycles, u64 n) { sys(SYS_REPORT, (u64)b, cycles, n); }

static volatile int shared_global = 1;
__attribute__((noinline)) static void empty_call(void) { __asm__ volatile(""); }
static inline void divide_by_zero(void) {
    unsigned a = 1, d = 0, z = 0;
    __asm__ volatile("divl %2" : "+a"(a), "+d"(d) : "r"(z));
}

static void selftests(void) {
    int st = -1;
    check(sys(SYS_GETPID, 0, 0, 0) == 1, "init pid=", 1);
    u64 frames = arg(5);
    i64 pid = fork();
    if (pid == 0) exit(7);
    i64 got = wait(&st);
    check(got == pid && st == 7, "fork+wait child status=", st);
    int sum = 0, reaped = 0;
    for (int i = 0; i < 5; i++)
        if (fork() == 0) exit(i + 1);
    while (wait(&st) > 0) { sum += st; reaped++; }
    check(reaped == 5 && sum == 15, "five children reaped, status sum=", sum);
    if (fork() == 0) { shared_global = 2; exit(shared_global); }
    wait(&st);
    check(st == 2 && shared_global == 1, "separate address spaces, parent sees ", shared_global);
    if (fork() == 0) { if (fork() == 0) exit(3); wait(&st); exit(st + 1); }
    wait(&st);
    check(st == 4, "grandchild status passed up=", st);
    check(arg(5) == frames, "frames leaked=", (i64)(frames - arg(5)));
    u64 pf0 = arg(3);
    u64 s = 0;
    for (int i = 0; i < 16; i++) HEAP[i * 512] = (u64)i + 1;
    for (int i = 0; i < 16; i++) s += HEAP[i * 512];
    check(arg(3) - pf0 == 16 && s == 136, "page faults handled=", (i64)(arg(3) - pf0));
    if (fork() == 0) { check(HEAP[512] == 2, "child inherits touched page=", (i64)HEAP[512]); exit(0); }
    wait(&st);
    sys(SYS_HEAPRESET, 0, 0, 0);
    if (fork() == 0) { *(volatile u64 *)0x1000 = 1; exit(0); }
    wait(&st);
    check(st == -14, "kernel page touched from user: killed, status=", st);
    if (fork() == 0) { *(volatile u64 *)(u64)user_main = 0; exit(0); }
    wait(&st);
    check(st == -14, "write to shared code: killed, status=", st);
    if (fork() == 0) { __asm__ volatile("ud2"); exit(0); }
    wait(&st);
    check(st == -106, "invalid opcode: killed, status=", st);
    u64 de0 = arg(4);
    divide_by_zero();
    check(arg(4) - de0 == 1, "divide errors trapped and skipped=", (i64)(arg(4) - de0));
    i64 t0 = sys(SYS_SLEEP, 0, 0, 0);
    i64 t1 = sys(SYS_SLEEP, 3, 0, 0);
    check(t1 - t0 >= 3, "timer ticks while sleeping>=", 3);
    check(sys(SYS_NULL, 0, 0, 0) == 0 && sys(99, 0, 0, 0) == -1, "null and unknown syscalls=", 2);
    say("passed=", passed);
    write(failed ? "selftest: result FAILED\n" : "selftest: result ok\n");
}

static void benchmarks(void) {
    u64 n = arg(0), forks = arg(1), t0, t1, total;
    int st;
    u64 mask = arg(ARG_MASK);
    if (mask & 1 << B_SYSCALL) {
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++) sys(SYS_NULL, 0, 0, 0);
        report(B_SYSCALL, rdtsc() - t0, n);
    }
    if (mask & 1 << B_IN) report(B_IN, (u64)sys(SYS_KBENCH, KB_IN, n, 0), n);
    if (mask & 1 << B_CR8) report(B_CR8, (u64)sys(SYS_KBENCH, KB_CR8, n, 0), n);
    if (mask & 1 << B_CALLRET) {
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++) empty_call();
        report(B_CALLRET, rdtsc() - t0, n);
    }
    sys(SYS_HEAPRESET, 0, 0, 0);
    total = 0;
    if (!(mask & 1 << B_PGFAULT)) n = 0;
    for (u64 done = 0; done < n;) {
        u64 k = n - done < HEAP_PAGES ? n - done : HEAP_PAGES;
        t0 = rdtsc();
        for (u64 i = 0; i < k; i++) HEAP[i * 512] = i;
        t1 = rdtsc();
        total += t1 - t0;
        done += k;
        sys(SYS_HEAPRESET, 0, 0, 0);
    }
    if (n) report(B_PGFAULT, total, n);
    n = arg(0);
    if (mask & 1 << B_DIVZERO) {
        t0 = rdtsc();
        for (u64 i = 0; i < n; i++) divide_by_zero();
        report(B_DIVZERO, rdtsc() - t0, n);
    }
    if (mask & 1 << B_PTEMOD) report(B_PTEMOD, (u64)sys(SYS_KBENCH, KB_PTEMOD, n, 0), n);
    if (mask & 1 << B_FORKWAIT) {
        t0 = rdtsc();
        for (u64 i = 0; i < forks; i++) {
            if (fork() == 0) exit(0);
            wait(&st);
        }
        report(B_FORKWAIT, rdtsc() - t0, forks);
    }
}

__attribute__((section(".uentry"), used)) void user_main(void) {
    selftests();
    if (arg(2)) {
        write("bench: begin\n");
        benchmarks();
        write("bench: end\n");
    }
    exit(0);
}
