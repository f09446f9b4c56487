/* Ring-3 assembly helpers (linked into the user region). */
	.text
/* Where a program's entry function returns to: exit(EAX). */
	.globl user_exit_trampoline
user_exit_trampoline:
	movl %eax, %ebx
	movl $0, %eax           /* SYS_EXIT */
	int $0x80
1:	jmp 1b

/* u32 u_divzero_loop(u32 n): n divisions by zero. The kernel resumes each
 * #DE at u_divzero_resume (registered with SYS_SETDE); returns how many
 * times that happened. */
	.globl u_divzero_loop, u_divzero_resume
u_divzero_loop:
	pushl %ebx
	pushl %esi
	movl 12(%esp), %ebx
	xorl %esi, %esi
1:	testl %ebx, %ebx
	jz 3f
	xorl %edx, %edx
	movl $1, %eax
	xorl %ecx, %ecx
	divl %ecx
	jmp 2f                  /* no #DE: not counted */
u_divzero_resume:
	incl %esi
2:	decl %ebx
	jmp 1b
3:	movl %esi, %eax
	popl %esi
	popl %ebx
	ret

	.section .note.GNU-stack, "", @progbits
