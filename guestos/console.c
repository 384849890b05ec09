/* guestos console: the 16550 UART at 0x3F8 (polled) and kprintf, which
 * formats a line and hands it to pv->console_write. */
#include "kernel.h"

#define COM1 0x3F8

void uart_init(void) {
    outb(COM1 + 1, 0x00);                  /* no UART interrupts */
    outb(COM1 + 3, 0x80);
    outb(COM1 + 0, 1);                     /* 115200 baud */
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);                  /* 8N1 */
    outb(COM1 + 2, 0xC7);
}

void uart_write(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        while (!(inb(COM1 + 5) & 0x20))
            ;
        outb(COM1, (u8)s[i]);
    }
}

struct buf { char b[256]; size_t n; };

static void put(struct buf *o, char c) {
    if (o->n == sizeof(o->b)) {
        pv->console_write(o->b, o->n);
        o->n = 0;
    }
    o->b[o->n++] = c;
}

static void putnum(struct buf *o, u64 v, int base, int neg) {
    char t[24];
    int i = 0;
    if (neg)
        put(o, '-');
    do {
        t[i++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (i)
        put(o, t[--i]);
}

/* %s %c %d %u %x and the long forms %ld %lu %lx; nothing else. */
void kprintf(const char *fmt, ...) {
    struct buf o;
    __builtin_va_list ap;
    o.n = 0;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        int lng = 0;
        fmt++;
        while (*fmt == 'l') {
            lng = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            while (*s)
                put(&o, *s++);
            break;
        }
        case 'c': put(&o, (char)__builtin_va_arg(ap, int)); break;
        case 'd': {
            i64 v = lng ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            putnum(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0);
            break;
        }
        case 'u': putnum(&o, lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, 0); break;
        case 'x': putnum(&o, lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16, 0); break;
        default: put(&o, '%'); put(&o, *fmt); break;
        }
    }
    __builtin_va_end(ap);
    if (o.n)
        pv->console_write(o.b, o.n);
}

void panic(const char *msg) {
    kprintf("guestos: panic: %s\n", msg);
    pv->shutdown(0x11);
    for (;;)
        ;
}
