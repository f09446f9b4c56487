/* Trap entry and exit, the context switch, and the #DE probe of the checks. */

/* One 16-byte stub per vector: push a dummy error code where the CPU pushes
 * none, push the vector number, jump to the common path. The IDT points at
 * trap_vectors + 16 * vector. */
	.text
	.align 16
	.globl trap_vectors
trap_vectors:
	.set vec, 0
	.rept 256
	.align 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21)
	.else
	pushl $0
	.endif
	pushl $vec
	jmp alltraps
	.set vec, vec + 1
	.endr

/* DS/ES/FS/GS hold USER_DS (a flat DPL-3 data segment) in the kernel too,
 * as Linux/i386 did, so trap entry and exit never load a segment register. */
alltraps:
	pushal
	cld
	pushl %esp              /* struct trapframe * */
	call trap
	addl $4, %esp
	.globl trapret
trapret:
	popal
	addl $8, %esp           /* vector, error code */
	iret

/* void swtch(u32 *old_esp, u32 new_esp): save the callee-saved registers on
 * the current kernel stack, switch stacks, restore them from the new one. */
	.globl swtch
swtch:
	movl 4(%esp), %eax
	movl 8(%esp), %edx
	pushl %ebp
	pushl %ebx
	pushl %esi
	pushl %edi
	movl %esp, (%eax)
	movl %edx, %esp
	popl %edi
	popl %esi
	popl %ebx
	popl %ebp
	ret

/* u32 de_probe(void): divides by zero; the #DE handler resumes at
 * de_probe_resume (returns 1). Returns 0 if no #DE happened. */
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
