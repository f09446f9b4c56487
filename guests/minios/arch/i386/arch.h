/* i386 definitions the portable kernel uses: the trap frame, descriptor
 * table sizes, how a new process enters ring 3. */
#ifndef MINIOS_ARCH_H
#define MINIOS_ARCH_H

#include "cpu.h"

#define ARCH_NAME "i386"
typedef u32 pte_t;

/* The registers saved on a trap, in the order trap.S pushes them. */
struct trapframe {
	uptr di, si, bp, oesp, bx, dx, cx, ax; /* pushal */
	uptr vector, err;
	uptr ip, cs, flags; /* pushed by the CPU */
	uptr sp, ss;        /* only when coming from ring 3 */
};

#define GDT_ENTRIES 6
#define IDT_QWORDS 256
#define SWTCH_REGS 4 /* callee-saved registers swtch pushes */
/* LAR of KERNEL_CS: P, DPL 0, code, readable; G, D (accessed bit masked). */
#define LAR_KERNEL_CS 0x00c09a00u
/* System-call arguments: EBX, ECX, EDX. */
#define SYSCALL_ARG0(tf) ((tf)->bx)
#define SYSCALL_ARG1(tf) ((tf)->cx)
/* i386 system calls are INT 0x80 only (see arch/x86_64/arch.h). */
static inline int arch_syscall_fault(struct trapframe *tf, uptr cr2)
{
	(void)tf;
	(void)cr2;
	return 0;
}

/* A new process: entry(arg) with a return address that calls exit. The top
 * user stack page is at kernel address `page`, user address USER_STACK_TOP -
 * PAGE_SIZE. */
static inline void arch_user_entry(struct trapframe *tf, uptr entry, uptr page, uptr arg, uptr ret)
{
	u32 *us = (u32 *)(page + PAGE_SIZE);
	us[-1] = (u32)arg;
	us[-2] = (u32)ret;
	tf->ip = entry;
	tf->sp = USER_STACK_TOP - 8;
	tf->di = arg;
}

#endif
