/* Multiboot v1 entry: flat 32-bit protected mode, paging off, IF=0. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, give memory info */

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.globl _start
_start:
	movl $boot_stack_top, %esp
	xorl %ebp, %ebp
	cld                     /* IF is 0 already (Multiboot); no POPF here, so
	                           the PV kernel runs no x86-gap instruction */
	pushl %ebx              /* multiboot info */
	pushl %eax              /* multiboot magic */
	call kmain
1:	jmp 1b

	.bss
	.align 16
	.globl boot_stack
boot_stack:
	.space 16384
	.globl boot_stack_top
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
