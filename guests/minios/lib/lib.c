/* Freestanding helpers shared by the kernel and the ring-3 programs. */
#include "lib.h"

/* Word-sized string operations when possible: a software CPU that steps REP
 * iterations one by one then does a quarter of the work. */
void *memset(void *d, int c, size_t n)
{
	void *r = d;
	if ((((uptr)d | n) & 3) == 0) {
		u32 v = (u8)c * 0x01010101u;
		n /= 4;
		__asm__ volatile("rep stosl" : "+D"(d), "+c"(n) : "a"(v) : "memory");
	} else {
		__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	}
	return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *r = d;
	if ((((uptr)d | (uptr)s | n) & 3) == 0) {
		n /= 4;
		__asm__ volatile("rep movsl" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	} else {
		__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	}
	return r;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

u64 udivmod64(u64 n, u64 d, u64 *rem)
{
	u64 q = 0, r = 0;
	if (!d) {
		if (rem)
			*rem = 0;
		return ~0ull;
	}
	if ((d >> 32) == 0 && (n >> 32) == 0) {
		if (rem)
			*rem = (u32)n % (u32)d;
		return (u32)n / (u32)d;
	}
	for (int i = 63; i >= 0; i--) {
		r = (r << 1) | ((n >> i) & 1);
		if (r >= d) {
			r -= d;
			q |= 1ull << i;
		}
	}
	if (rem)
		*rem = r;
	return q;
}

/* What gcc calls for 64-bit '/' and '%' on i386 (no 32-bit libgcc here). */
u64 __udivdi3(u64 n, u64 d);
u64 __umoddi3(u64 n, u64 d);
u64 __udivdi3(u64 n, u64 d) { return udivmod64(n, d, NULL); }
u64 __umoddi3(u64 n, u64 d)
{
	u64 r;
	udivmod64(n, d, &r);
	return r;
}

struct out {
	char *buf;
	size_t size, len;
};

static void put(struct out *o, char c)
{
	if (o->len + 1 < o->size)
		o->buf[o->len] = c;
	o->len++;
}

static void put_num(struct out *o, u64 v, u32 base, int neg, int width, char pad)
{
	char tmp[24];
	int n = 0;
	do {
		u64 r;
		v = udivmod64(v, base, &r);
		tmp[n++] = "0123456789abcdef"[r];
	} while (v);
	if (neg)
		tmp[n++] = '-';
	for (int i = n; i < width; i++)
		put(o, pad);
	while (n)
		put(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&o, *fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0, lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l') {
			lng++;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			s64 v = lng >= 2 ? va_arg(ap, s64) : lng ? va_arg(ap, long) : va_arg(ap, s32);
			put_num(&o, (u64)(v < 0 ? -v : v), 10, v < 0, width, pad);
			break;
		}
		case 'u':
			put_num(&o, lng >= 2 ? va_arg(ap, u64) : lng ? va_arg(ap, unsigned long) : va_arg(ap, u32),
				10, 0, width, pad);
			break;
		case 'x':
			put_num(&o, lng >= 2 ? va_arg(ap, u64) : lng ? va_arg(ap, unsigned long) : va_arg(ap, u32),
				16, 0, width, pad);
			break;
		case 'p':
			put(&o, '0');
			put(&o, 'x');
			put_num(&o, (uptr)va_arg(ap, void *), 16, 0, 2 * sizeof(void *), '0');
			break;
		case 'c':
			put(&o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			while (*s)
				put(&o, *s++);
			break;
		}
		case '%':
			put(&o, '%');
			break;
		default:
			put(&o, '%');
			if (*fmt)
				put(&o, *fmt);
			else
				fmt--;
		}
	}
	if (size)
		buf[o.len < size ? o.len : size - 1] = 0;
	return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
