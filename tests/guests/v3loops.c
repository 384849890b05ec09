/* Loops that gcc -O2 -march=x86-64-v3 vectorises with AVX2 and FMA (vfmadd,
   vfmsub, vpmulld, vpsrad, vpsllvd on ymm registers), folded into hashes of
   the arrays: the output is the same wherever the instructions are right.
   tests/v3program.py builds it statically and runs it natively and in guests. */
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#define N 4096
static float a[N], b[N], c[N], d[N];
static int32_t ia[N], ib[N], ic[N];
static uint8_t s8[N];
static double da[N], db[N], dd[N];

static uint32_t fold(const void *p, size_t n) {
    const uint8_t *q = p; uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ q[i]) * 16777619u;
    return h;
}

int main(void) {
    uint32_t x = 12345;
    for (int i = 0; i < N; i++) {
        x = x * 1103515245u + 12345u;
        a[i] = (float)(x >> 8) / 65536.0f - 100.0f;
        b[i] = (float)((x >> 3) & 0xffff) / 1024.0f + 0.5f;
        ia[i] = (int32_t)x; ib[i] = (int32_t)(x >> 7) - 40000;
        da[i] = (double)a[i] * 1.5; db[i] = (double)b[i] / 3.0;
        s8[i] = (uint8_t)(x >> 13);
    }
    for (int r = 0; r < 8; r++) {
        for (int i = 0; i < N; i++) c[i] = a[i] * b[i] + c[i];          /* vfmadd ps */
        for (int i = 0; i < N; i++) d[i] = a[i] > b[i] ? a[i] - b[i] : b[i] * 0.25f;  /* vcmpps + blend */
        for (int i = 0; i < N; i++) ic[i] = ia[i] * ib[i] + (ic[i] >> 3);   /* vpmulld vpsrad */
        for (int i = 0; i < N; i++) ia[i] = (ia[i] ^ ib[i]) + (int32_t)((uint32_t)ic[i] << (i & 7));
        for (int i = 0; i < N; i++) dd[i] = da[i] * db[i] - dd[i] * 0.5;    /* vfmsub pd */
        for (int i = 0; i < N; i++) s8[i] = (uint8_t)(s8[i] + (s8[i] >> 1) + r);
    }
    float m = 0; int32_t mi = 0;
    for (int i = 0; i < N; i++) { if (c[i] > m) m = c[i]; if (ic[i] > mi) mi = ic[i]; }
    char text[200]; snprintf(text, sizeof text, "max %.6f %d", (double)m, mi);
    printf("V3 c=%08x d=%08x ic=%08x ia=%08x dd=%08x s8=%08x len=%zu %s\n", fold(c, sizeof c), fold(d, sizeof d),
           fold(ic, sizeof ic), fold(ia, sizeof ia), fold(dd, sizeof dd), fold(s8, sizeof s8), strlen(text), text);
    return 0;
}
