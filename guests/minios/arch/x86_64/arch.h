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
/* System calls come through SYSCALL (trap.S: syscall_entry builds a trap
 * frame with vector T_SYSCALL). SYSCALL itself overwrites RCX (return RIP)
 * and R11 (RFLAGS), so the arguments are in RDI, RSI, RDX, as in Linux's
 * x86-64 ABI; the number in RAX, the result in RAX. */
#define SYSCALL_ARG0(tf) ((tf)->di)
#define SYSCALL_ARG1(tf) ((tf)->si)

/* SYSCALL's entry (trap.S). */
extern char syscall_entry[];

/*
 * A SYSCALL that did not leave ring 3. On kvm_pvm (a software KVM that runs
 * the guest at hardware CPL 3 with its own event ABI, which minios does not
 * speak) a user-mode SYSCALL jumps to LSTAR with RCX/R11 set and the SFMASK
 * bits cleared, but stays at CPL 3 on the user stack; fetching the
 * supervisor-only entry page then raises #PF, delivered through the IDT to
 * the kernel stack like any exception. The frame then holds exactly the
 * state SYSCALL produced, so the kernel completes the system call from it:
 * the return address is RCX, the user's RFLAGS are R11. A program that jumps
 * to syscall_entry itself gets nothing more than a system call with the RIP
 * and flags it chose (flags sanitised, RIP must be a canonical user address,
 * else the fault kills it as before). Returns 1 if tf is such a system call
 * (and rewrites ip/flags for the return), 0 otherwise.
 */
static inline int arch_syscall_fault(struct trapframe *tf, uptr cr2)
{
	if (tf->vector != 14 || tf->ip != (uptr)syscall_entry || cr2 != (uptr)syscall_entry ||
	    (tf->cx >> 47) != 0)
		return 0;
	tf->ip = tf->cx;
	/* CF PF AF ZF SF TF DF OF AC ID from R11; IF on, IOPL 0 */
	tf->flags = (tf->r11 & 0x240dd5u) | EFLAGS_IF | 0x2;
	return 1;
}

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
