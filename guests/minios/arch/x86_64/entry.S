/*
 * Multiboot v1 entry for the x86-64 kernel. The loader starts us in flat
 * 32-bit protected mode with paging off; we switch to long mode the classic
 * way: PAE page tables (2 MiB pages identity-mapping the low 4 GiB), CR4.PAE,
 * EFER.LME *before* CR0.PG (so paging is only ever on in long mode, which
 * kvm_pvm requires), then a far jump to a 64-bit code segment.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.code32
	.globl _start
_start:
	cld
	movl $boot_stack_top, %esp
	movl %eax, %edi                 /* multiboot magic: kmain's 1st argument */
	movl %ebx, %esi                 /* multiboot info: 2nd */

	movl $boot_pdpt + 3, boot_pml4  /* present, writable */
	movl $boot_pd + 3, %eax
	movl %eax, boot_pdpt
	addl $4096, %eax
	movl %eax, boot_pdpt + 8
	addl $4096, %eax
	movl %eax, boot_pdpt + 16
	addl $4096, %eax
	movl %eax, boot_pdpt + 24
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $21, %eax
	orl $0x83, %eax                 /* present, writable, 2 MiB page */
	movl %eax, boot_pd(, %ecx, 8)
	incl %ecx
	cmpl $2048, %ecx
	jb 1b

	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx          /* EFER */
	rdmsr
	orl $0x101, %eax                /* LME, and SCE: SYSCALL/SYSRET */
	wrmsr
	/* System calls (arch/x86_64/trap.S, syscall_entry). Set here, at boot,
	 * in both flavours: the PV kernel makes no privileged instruction after
	 * this switch (docs/hypercalls.md). */
	movl $0xc0000081, %ecx          /* STAR */
	xorl %eax, %eax                 /* (the 32-bit SYSCALL EIP: unused) */
	movl $0x00100008, %edx          /* SYSCALL: CS 0x08, SS 0x10; SYSRET: SS 0x10+8|3, CS 0x10+16|3 */
	wrmsr
	movl $0xc0000082, %ecx          /* LSTAR: the 64-bit entry */
	movl $syscall_entry, %eax
	xorl %edx, %edx
	wrmsr
	movl $0xc0000084, %ecx          /* SFMASK: RFLAGS bits SYSCALL clears */
	movl $0x47700, %eax             /* TF, IF, DF, IOPL, NT, AC */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG (and PE): long mode is active now */
	movl %eax, %cr0
	lgdt boot_gdtr
	ljmp $0x08, $long_mode

	.code64
long_mode:
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %edi, %edi                 /* upper halves are undefined after the switch */
	movl %esi, %esi
	movl $boot_stack_top, %esp
	call kmain
2:	jmp 2b

	.section .rodata
	.align 8
boot_gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: data */
boot_gdtr:
	.word boot_gdtr - boot_gdt - 1
	.long boot_gdt

	.bss
	.align 4096
boot_pml4:
	.space 4096
boot_pdpt:
	.space 4096
boot_pd:
	.space 4 * 4096
	.align 16
	.globl boot_stack
boot_stack:
	.space 16384
	.globl boot_stack_top
boot_stack_top:

	.section .note.GNU-stack, "", @progbits
