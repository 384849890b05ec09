/* guestos CPU tables: TSS (kernel stack for traps from CPL3), IDT (every
 * vector to entry.S; int 0x80 callable from CPL3), the 8259 PICs. */
#include "kernel.h"

extern u64 gdt[];
extern u64 vectors[256];

static struct __attribute__((packed)) {
    u32 rsv0;
    u64 rsp0, rsp1, rsp2;
    u64 rsv1;
    u64 ist[7];
    u64 rsv2;
    u16 rsv3, iomap;
} tss;

static struct __attribute__((packed)) { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, rsv; } idt[256];
static u16 pic_mask = 0xFFFF;

void *memset(void *d, int c, size_t n) {
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return d;
}

void tss_set_rsp0(u64 rsp0) { tss.rsp0 = rsp0; }

static void set_gate(int v, u64 handler, int dpl) {
    idt[v].off0 = handler & 0xFFFF;
    idt[v].sel = 0x08;
    idt[v].ist = 0;
    idt[v].type = 0x8E | (dpl << 5);       /* present, 64-bit interrupt gate */
    idt[v].off1 = (handler >> 16) & 0xFFFF;
    idt[v].off2 = handler >> 32;
    idt[v].rsv = 0;
}

void cpu_init(void) {
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    tss.iomap = sizeof(tss);
    gdt[5] = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89UL << 40 | ((limit >> 16) & 0xF) << 48
             | ((base >> 24) & 0xFF) << 56;
    gdt[6] = base >> 32;
    __asm__ volatile("ltr %w0" :: "r"(0x28));
    for (int v = 0; v < 256; v++)
        set_gate(v, vectors[v], v == 0x80 ? 3 : 0);
    struct __attribute__((packed)) { u16 limit; u64 base; } d = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" :: "m"(d));
}

static void pic_write_masks(void) {
    outb(0x21, pic_mask & 0xFF);
    outb(0xA1, pic_mask >> 8);
}

void pic_init(void) {
    outb(0x20, 0x11); outb(0xA0, 0x11);    /* ICW1: edge, cascade, ICW4 */
    outb(0x21, 0x20); outb(0xA1, 0x28);    /* vectors 32..47 */
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    pic_write_masks();
}

void pic_unmask(int irq) {
    pic_mask &= ~(1 << irq);
    pic_write_masks();
}

void pic_eoi(int irq) {
    if (irq >= 8)
        outb(0xA0, 0x20);
    outb(0x20, 0x20);
}
