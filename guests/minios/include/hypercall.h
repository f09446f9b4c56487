/*
 * popek hypercall ABI (see docs/hypercalls.md): a port-I/O doorbell.
 * EAX = number, arguments in EBX, ECX, ESI, EDI (RBX.. in 64-bit mode),
 * DX = 0x5650, then `in %dx, %eax`. The VMM puts the result in EAX (>= 0
 * success, -errno on failure) and changes no other register.
 */
#ifndef MINIOS_HYPERCALL_H
#define MINIOS_HYPERCALL_H

#include "types.h"

#define HC_PORT 0x5650
#define HC_ABI_VERSION 1

#define HC_VERSION 0        /* -> HC_ABI_VERSION */
#define HC_CONSOLE_WRITE 1  /* EBX = guest-physical address, ECX = length -> bytes written */
#define HC_EXIT 2           /* EBX = code: the VM ends with status (code << 1) | 1 */
#define HC_POWER_OFF 3      /* the VM powers off: status 0 */
#define HC_IRQ_DISABLE 4    /* -> previous IF (0 or 0x200) */
#define HC_IRQ_ENABLE 5     /* -> previous IF (0 or 0x200) */
#define HC_SAVE_FL 6        /* -> IF (0 or 0x200) */
#define HC_RESTORE_FL 7     /* EBX = flags: IF := EBX & 0x200 -> 0 */
#define HC_HALT 8           /* IF := 1 and wait for an interrupt (STI; HLT) -> 0 */
#define HC_WRITE_CR3 9      /* EBX = page directory (guest-physical); turns paging on -> 0 */
#define HC_READ_CR3 10      /* -> CR3 */
#define HC_READ_CR2 11      /* -> CR2 (the last page-fault address) */
#define HC_INVLPG 12        /* EBX = linear address -> 0 */
#define HC_LOAD_GDT 13      /* EBX = linear base, ECX = limit -> 0 */
#define HC_LOAD_IDT 14      /* EBX = linear base, ECX = limit -> 0 */
#define HC_LOAD_TR 15       /* EBX = selector of an available 32-bit TSS -> 0 */
#define HC_PORT_IN 16       /* EBX = port, ECX = size 1/2/4 -> value */
#define HC_PORT_OUT 17      /* EBX = port, ECX = size 1/2/4, ESI = value -> 0 */
#define HC_COUNT 18

#define HC_ENOSYS 38
#define HC_EINVAL 22
#define HC_EFAULT 14

#ifdef PV_SHIM
/* Test-only: the "VMM" is a function inside the kernel (see kernel/pv_shim.c). */
s32 pv_shim_call(u32 nr, uptr a, uptr b, uptr c, uptr d);
#endif

static inline s32 hypercall(u32 nr, uptr a, uptr b, uptr c, uptr d)
{
#ifdef PV_SHIM
	return pv_shim_call(nr, a, b, c, d);
#else
	u32 ret;
	__asm__ volatile("inl %%dx, %%eax"
			 : "=a"(ret)
			 : "a"(nr), "b"(a), "c"(b), "S"(c), "D"(d), "d"(HC_PORT)
			 : "memory");
	return (s32)ret;
#endif
}

static inline s32 hypercall0(u32 nr) { return hypercall(nr, 0, 0, 0, 0); }
static inline s32 hypercall1(u32 nr, uptr a) { return hypercall(nr, a, 0, 0, 0); }
static inline s32 hypercall2(u32 nr, uptr a, uptr b) { return hypercall(nr, a, b, 0, 0); }
static inline s32 hypercall3(u32 nr, uptr a, uptr b, uptr c) { return hypercall(nr, a, b, c, 0); }

#endif
