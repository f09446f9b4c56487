/*
 * lib: pure functions used by both the kernel and the ring-3 programs.
 * They are linked into the user-accessible region of the image (see link.ld),
 * so they must not use writable globals.
 */
#ifndef MINIOS_LIB_H
#define MINIOS_LIB_H

#include "types.h"

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* 64-bit division without libgcc (the host has no 32-bit libgcc). */
u64 udivmod64(u64 n, u64 d, u64 *rem);

/* A small vsnprintf: %s %c %d %u %x %p, l (long) and ll (64-bit), width, '0' flag. */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...);

/* SHA-256 (FIPS 180-4). */
struct sha256 {
	u32 h[8];
	u64 len;
	u8 buf[64];
	u32 used;
};
void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const void *data, size_t n);
void sha256_final(struct sha256 *s, u8 out[32]);

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

#endif
