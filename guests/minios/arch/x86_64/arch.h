/* x86-64 definitions the portable kernel uses: the trap frame, descriptor
 * table sizes, how a new process enters ring 3. */
#ifndef MINIOS_ARCH_H
#define MINIOS_ARCH_H

#include "cpu.h"

#define ARCH_NAME "x86-64"
typedef u64 pte_t;

/* The registers saved on a trap, in the order trap.S pushes them. */
struct trapframe {
	uptr r15, r14, r13, r12, r11, r10, r9, r8;
	uptr bp, di, si, dx, cx, bx, ax;
	uptr vector, err;
	uptr ip, cs, flags, sp, ss; /* pushed by the CPU (always, in 64-bit mode) */
};

#define GDT_ENTRIES 7 /* the TSS descriptor takes two */
#define IDT_QWORDS 512
#define SWTCH_REGS 6 /* callee-saved registers swtch pushes */
/* LAR of KERNEL_CS: P, DPL 0, code, readable; G, L (accessed bit masked). */
#define LAR_KERNEL_CS 0x00a09a00u
/* System-call arguments: EBX, ECX, EDX (RBX, RCX, RDX), as on i386. */
#define SYSCALL_ARG0(tf) ((tf)->bx)
#define SYSCALL_ARG1(tf) ((tf)->cx)

/* A new process: entry(arg) (arg in RDI) with a return address that calls
 * exit. The top user stack page is at kernel address `page`. */
static inline void arch_user_entry(struct trapframe *tf, uptr entry, uptr page, uptr arg, uptr ret)
{
	u64 *us = (u64 *)(page + PAGE_SIZE);
	us[-1] = ret;
	tf->ip = entry;
	tf->sp = USER_STACK_TOP - 8; /* (RSP + 8) % 16 == 0 at entry, as the ABI wants */
	tf->di = arg;
}

#endif
