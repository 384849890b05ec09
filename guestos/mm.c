/* guestos memory: a free list of 4 KiB frames (identity-mapped in the
 * kernel, so physical == virtual), and per-process address spaces.
 * Every page-table entry is written through pv->queue_pte/set_pte or
 * pv_set_pte_now/pv_update_va, so under pyvmm's interface they become
 * batched mmu_update hypercalls or single update_va ones. */
#include "kernel.h"

extern char _bss_end[], _user_lma[], _user_start[], _user_data[], _user_end[];

/* The user image's text and read-only data: copied once, then mapped
 * read-only into every address space (never freed); a fork shares them. */
static u64 text_frames[64];
static u64 ntext;

/* Free frames live on stacks outside the frames themselves, so freeing
 * never writes a page that may still be a (shadowed) page table.  Page-table
 * frames have their own pool and go back to it with all entries cleared
 * (through pv-ops), so they are reused without zeroing. */
#define MAX_FRAMES (0x40000000UL / PAGE)
static u64 free_stack[MAX_FRAMES];
static u64 nfree;
static u64 pt_pool[4096];
static u64 npt;

static void zero_page(u64 pa) {
    u64 n = PAGE / 8;
    void *d = (void *)pa;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(0UL) : "memory");
}

void mm_init(u64 mem_end) {
    u64 start = ((u64)_bss_end + 0x1FFFFF) & ~0x1FFFFFUL;
    if (mem_end > 0x40000000UL)
        mem_end = 0x40000000UL;             /* the kernel maps the first GiB */
    for (u64 pa = (mem_end & ~(PAGE - 1)) - PAGE; pa >= start; pa -= PAGE)
        frame_free(pa);
}

static u64 frame_take(void) {
    if (!nfree)
        panic("out of memory");
    return free_stack[--nfree];
}

u64 frame_alloc(void) {
    u64 pa = frame_take();
    zero_page(pa);
    return pa;
}

void frame_free(u64 pa) { free_stack[nfree++] = pa; }

u64 frames_free(void) { return nfree + npt; }

static u64 pt_alloc(void) { return npt ? pt_pool[--npt] : frame_alloc(); }

static void pt_free(u64 pa) {
    if (npt < sizeof(pt_pool) / sizeof(pt_pool[0]))
        pt_pool[npt++] = pa;
}

/* pml4 -> the user page directory (PDPT[1]). */
static u64 *user_pd(u64 pml4) {
    u64 *pdpt = (u64 *)(((u64 *)pml4)[0] & PTE_ADDR);
    return (u64 *)(pdpt[1] & PTE_ADDR);
}

static u64 as_skeleton(void) {
    u64 pml4 = pt_alloc(), pdpt = pt_alloc(), pd = pt_alloc();
    pv->queue_pte((u64 *)pml4, pdpt | PTE_P | PTE_W | PTE_U);
    pv->queue_pte((u64 *)pdpt, (u64)kernel_pd | PTE_P | PTE_W);
    pv->queue_pte((u64 *)pdpt + 1, pd | PTE_P | PTE_W | PTE_U);
    pv->commit_ptes();
    return pml4;
}

u64 *as_pte(u64 pml4, u64 va, int create) {
    u64 *pd = user_pd(pml4);
    u64 i = (va - USER_BASE) >> 21 & 511, j = va >> 12 & 511;
    if (va < USER_BASE || va >= USER_BASE + (1UL << 30))
        return 0;
    if (!(pd[i] & PTE_P)) {
        if (!create)
            return 0;
        pv->queue_pte(&pd[i], pt_alloc() | PTE_P | PTE_W | PTE_U);
        pv->commit_ptes();
    }
    return (u64 *)(pd[i] & PTE_ADDR) + j;
}

static void map_new(u64 pml4, u64 va, u64 pa) {
    u64 *pte = as_pte(pml4, va, 1);
    pv->queue_pte(pte, pa | PTE_P | PTE_W | PTE_U);
}

static int shared_text(u64 pte) { return (pte & (PTE_P | PTE_W)) == PTE_P; }

u64 as_create(void) {
    u64 pml4 = as_skeleton();
    u64 size = (u64)(_user_end - _user_start), text = (u64)(_user_data - _user_start);
    for (u64 off = 0; off < size; off += PAGE) {
        if (off < text) {
            u64 k = off / PAGE;
            if (k >= ntext) {
                text_frames[k] = frame_alloc();
                memcpy((void *)text_frames[k], _user_lma + off, PAGE);
                ntext = k + 1;
            }
            pv->queue_pte(as_pte(pml4, USER_BASE + off, 1), text_frames[k] | PTE_P | PTE_U);
            continue;
        }
        u64 pa = frame_alloc();
        u64 n = size - off < PAGE ? size - off : PAGE;
        memcpy((void *)pa, _user_lma + off, n);
        map_new(pml4, USER_BASE + off, pa);
    }
    for (u64 k = 1; k <= STACK_PAGES; k++)
        map_new(pml4, STACK_TOP - k * PAGE, frame_alloc());
    pv->commit_ptes();
    return pml4;
}

u64 as_copy(u64 src) {
    u64 dst = as_skeleton();
    u64 *spd = user_pd(src), *dpd = user_pd(dst);
    for (int i = 0; i < 512; i++) {
        if (!(spd[i] & PTE_P))
            continue;
        u64 *spt = (u64 *)(spd[i] & PTE_ADDR);
        u64 *dpt = (u64 *)pt_alloc();
        pv->queue_pte(&dpd[i], (u64)dpt | PTE_P | PTE_W | PTE_U);
        for (int j = 0; j < 512; j++) {
            if (!(spt[j] & PTE_P))
                continue;
            if (shared_text(spt[j])) {
                pv->queue_pte(&dpt[j], spt[j]);
                continue;
            }
            u64 pa = frame_take();
            memcpy((void *)pa, (void *)(spt[j] & PTE_ADDR), PAGE);
            pv->queue_pte(&dpt[j], pa | (spt[j] & ~PTE_ADDR));
        }
    }
    pv->commit_ptes();
    return dst;
}

void as_destroy(u64 pml4) {
    u64 *pd = user_pd(pml4);
    u64 *pdpt = (u64 *)(((u64 *)pml4)[0] & PTE_ADDR);
    for (int i = 0; i < 512; i++) {
        if (!(pd[i] & PTE_P))
            continue;
        u64 *pt = (u64 *)(pd[i] & PTE_ADDR);
        for (int j = 0; j < 512; j++)
            if (pt[j] & PTE_P) {
                if (!shared_text(pt[j]))
                    frame_free(pt[j] & PTE_ADDR);
                pv->queue_pte(&pt[j], 0);
            }
        pv->queue_pte(&pd[i], 0);
        pt_free((u64)pt);
    }
    pv->queue_pte(&pdpt[0], 0);
    pv->queue_pte(&pdpt[1], 0);
    pv->queue_pte((u64 *)pml4, 0);
    pv->commit_ptes();
    pt_free((u64)pd);
    pt_free((u64)pdpt);
    pt_free(pml4);
}

int as_fault(u64 pml4, u64 va) {
    if (va < HEAP_BASE || va >= HEAP_BASE + HEAP_PAGES * PAGE)
        return 0;
    u64 *pte = as_pte(pml4, va, 1);
    if (*pte & PTE_P)
        return 0;                            /* a protection fault: not ours to fix */
    pv_set_pte_now(pte, frame_alloc() | PTE_P | PTE_W | PTE_U);
    return 1;
}

void as_heap_reset(u64 pml4) {
    for (u64 k = 0; k < HEAP_PAGES; k++) {
        u64 *pte = as_pte(pml4, HEAP_BASE + k * PAGE, 0);
        if (!pte)
            return;
        if (*pte & PTE_P) {
            frame_free(*pte & PTE_ADDR);
            pv->queue_pte(pte, 0);
        }
    }
    pv->commit_ptes();
    pv->flush_all();
}
