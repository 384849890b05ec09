/* 4 KiB random reads with O_DIRECT, for bench/virtio.py (b): every read is
   one virtio-blk request at an offset the page cache has not seen.
   usage: randread DEVICE COUNT; prints "RANDREAD n=COUNT bytes=TOTAL". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: randread DEVICE COUNT\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    long blocks = size / 4096, count = atol(argv[2]), total = 0;
    void *buf;
    if (blocks <= 0 || posix_memalign(&buf, 4096, 4096))
        return 1;
    uint64_t x = 0x9E3779B97F4A7C15ull;          /* xorshift64: the same offsets in every VMM */
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ssize_t n = pread(fd, buf, 4096, (off_t)(x % blocks) * 4096);
        if (n != 4096) {
            perror("pread");
            return 1;
        }
        total += n;
    }
    printf("RANDREAD n=%ld bytes=%ld\n", count, total);
    return 0;
}
