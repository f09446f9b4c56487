/* x86-64 system-call stub: SYSCALL, RAX = number, arguments in RDI, RSI,
 * RDX, the result in RAX; the CPU overwrites RCX (return RIP) and R11
 * (RFLAGS). */
#ifndef MINIOS_USYS_ARCH_H
#define MINIOS_USYS_ARCH_H

static inline sptr sys3(uptr n, uptr a, uptr b, uptr c)
{
	sptr r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

#endif
