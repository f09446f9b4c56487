/* Ring-3 assembly helpers (linked into the user region), x86-64. */
	.text
	.globl user_exit_trampoline
user_exit_trampoline:
	movslq %eax, %rdi
	movl $0, %eax                   /* SYS_EXIT */
	syscall
1:	jmp 1b

/* u32 u_divzero_loop(u32 n): see arch/i386/user/uasm.S. */
	.globl u_divzero_loop, u_divzero_resume
u_divzero_loop:
	pushq %rbx
	movl %edi, %ebx
	xorl %esi, %esi
1:	testl %ebx, %ebx
	jz 3f
	xorl %edx, %edx
	movl $1, %eax
	xorl %ecx, %ecx
	divl %ecx
	jmp 2f
u_divzero_resume:
	incl %esi
2:	decl %ebx
	jmp 1b
3:	movl %esi, %eax
	popq %rbx
	ret

	.section .note.GNU-stack, "", @progbits
