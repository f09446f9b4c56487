/* i386 system-call stub: int $0x80, EAX = number, arguments in EBX, ECX,
 * EDX, the result in EAX. */
#ifndef MINIOS_USYS_ARCH_H
#define MINIOS_USYS_ARCH_H

static inline sptr sys3(uptr n, uptr a, uptr b, uptr c)
{
	sptr r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
	return r;
}

#endif
