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
