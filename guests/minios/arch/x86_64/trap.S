/* Trap entry and exit, the context switch, and the #DE probe of the checks. */

/* One 16-byte stub per vector (see arch/i386/trap.S). */
	.text
	.align 16
	.globl trap_vectors
trap_vectors:
	.set vec, 0
	.rept 256
	.align 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp alltraps
	.set vec, vec + 1
	.endr

/* 64-bit mode always pushes SS:RSP, aligned to 16 bytes; with the 15
 * registers below the frame is 176 bytes, so trap() gets an aligned stack. */
alltraps:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi                 /* struct trapframe * */
	call trap
	.globl trapret
trapret:
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp                  /* vector, error code */
	iretq

/*
 * System calls: SYSCALL from ring 3 (STAR, LSTAR, SFMASK and EFER.SCE are set
 * in entry.S). The CPU loads CS/SS from STAR, puts the return RIP in RCX and
 * RFLAGS in R11, clears the SFMASK bits (IF among them: no interrupt until we
 * are on the kernel stack) and leaves RSP alone. One CPU and no per-CPU data
 * behind GS: the user RSP goes to a scratch variable and the current
 * process's kernel stack top comes from syscall_kstack (desc.c), so no SWAPGS.
 * The entry builds the same trap frame as an interrupt would (vector
 * T_SYSCALL = 0x80), so trap()/syscall(), fork/spawn frames and the scheduler
 * are shared with the interrupt path.
 */
#define USER_CS 0x23
#define USER_DS 0x1b
#define TF_IP 136
#define TF_CS 144
#define TF_FLAGS 152
	.globl syscall_entry
syscall_entry:
	movq %rsp, syscall_user_rsp(%rip)
	movq syscall_kstack(%rip), %rsp
	pushq $USER_DS                  /* ss */
	pushq syscall_user_rsp(%rip)    /* rsp */
	pushq %r11                      /* rflags */
	pushq $USER_CS                  /* cs */
	pushq %rcx                      /* rip */
	pushq $0                        /* error code */
	pushq $0x80                     /* vector: T_SYSCALL */
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi
	call trap
#ifdef PARAVIRT
	/* SYSRET is privileged; the paravirtual kernel returns with IRETQ, as
	 * from any trap (it executes no privileged instruction after boot). */
	jmp trapret
#else
	/* SYSRET only when the frame is still a plain return to 64-bit ring 3:
	 * RIP canonical (SYSRET with a non-canonical RCX faults in ring 0 on
	 * Intel, on the user stack), and no TF/RF/VM that SYSRET would not
	 * honour as IRET does. Anything else returns through IRETQ. */
	cmpq $USER_CS, TF_CS(%rsp)
	jne trapret
	movq TF_IP(%rsp), %rcx
	shrq $47, %rcx
	jnz trapret
	testq $0x30100, TF_FLAGS(%rsp)  /* TF, RF, VM */
	jnz trapret
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	movq 16(%rsp), %rcx             /* rip (the frame's ip, after vector and error code) */
	movq 32(%rsp), %r11             /* rflags: SYSRET loads them (IF is set: user mode) */
	movq 40(%rsp), %rsp             /* the user stack; no interrupt until SYSRET (IF = 0) */
	sysretq
#endif

	.bss
	.align 8
syscall_user_rsp:
	.quad 0
	.text

/* void swtch(uptr *old_sp, uptr new_sp) */
	.globl swtch
swtch:
	pushq %rbp
	pushq %rbx
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, (%rdi)
	movq %rsi, %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbx
	popq %rbp
	ret

	.globl de_probe, de_probe_insn, de_probe_resume
de_probe:
	xorl %edx, %edx
	movl $1, %eax
	xorl %ecx, %ecx
de_probe_insn:
	divl %ecx
	xorl %eax, %eax
	ret
de_probe_resume:
	movl $1, %eax
	ret

	.section .note.GNU-stack, "", @progbits
