/* GDT, IDT and TSS (64-bit). */
#include "kernel.h"

struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3, iomap_base;
	u8 iomap[8192 + 1]; /* one bit per port, 1 = ring 3 may not use it; 0xff terminator */
} __attribute__((packed));

u64 gdt[GDT_ENTRIES] __attribute__((aligned(8)));
u64 idt[IDT_QWORDS] __attribute__((aligned(16)));
struct tss tss __attribute__((aligned(128)));

static u64 desc(u32 base, u32 limit, u8 access, u8 flags)
{
	u32 lo = (limit & 0xffff) | (base << 16);
	u32 hi = ((base >> 16) & 0xff) | ((u32)access << 8) | (limit & 0xf0000) | ((u32)flags << 20) |
		 (base & 0xff000000);
	return ((u64)hi << 32) | lo;
}

static void set_gate(int v, uptr off, u8 type)
{
	idt[2 * v] = (off & 0xffff) | ((u64)KERNEL_CS << 16) | ((u64)type << 40) |
		     (((off >> 16) & 0xffff) << 48);
	idt[2 * v + 1] = off >> 32;
}

/* The kernel stack of the current process for SYSCALL (trap.S): SYSCALL
 * does not switch stacks, and minios (one CPU, no per-CPU GS area) keeps
 * it in a plain variable instead of behind SWAPGS. */
uptr syscall_kstack;

void tss_set_kernel_stack(uptr sp0)
{
	tss.rsp0 = sp0; /* read by the CPU (or the VMM) on each ring 3 -> 0 transition */
	syscall_kstack = sp0;
}

void desc_init(void)
{
	gdt[0] = 0;
	gdt[1] = desc(0, 0xfffff, 0x9a, 0xa); /* KERNEL_CS: 64-bit code (L) */
	gdt[2] = desc(0, 0xfffff, 0x92, 0xc); /* KERNEL_DS */
	gdt[3] = desc(0, 0xfffff, 0xf2, 0xc); /* USER_DS (SYSRET's SS) */
	gdt[4] = desc(0, 0xfffff, 0xfa, 0xa); /* USER_CS: 64-bit code, DPL 3 (SYSRET's CS) */
	uptr t = (uptr)&tss;
	gdt[5] = desc((u32)t, sizeof(tss) - 1, 0x89, 0x0); /* available 64-bit TSS */
	gdt[6] = t >> 32;

	memset(&tss, 0, sizeof(tss));
	tss.iomap_base = (u16)__builtin_offsetof(struct tss, iomap);
	memset(tss.iomap, 0xff, sizeof(tss.iomap));
#ifndef PARAVIRT
	tss.iomap[BENCH_PORT / 8] &= (u8)~(1u << (BENCH_PORT % 8));
#endif

	/* All gates DPL 0: system calls enter through SYSCALL (entry.S sets
	 * EFER.SCE, STAR, LSTAR and SFMASK), not INT 0x80, on x86-64. */
	for (int v = 0; v < 256; v++)
		set_gate(v, (uptr)trap_vectors + 16 * v, 0x8e);

	lgdt((uptr)gdt, GDT_LIMIT);
	/* Reload CS with a far return, then the data segments (see arch/i386/desc.c). */
	__asm__ volatile("pushq %0\n\t"
			 "leaq 1f(%%rip), %%rax\n\t"
			 "pushq %%rax\n\t"
			 "lretq\n1:\n\t"
			 "movw %w1, %%ss\n\t"
			 "movw %w2, %%ds\n\tmovw %w2, %%es\n\t"
			 "movw %w2, %%fs\n\tmovw %w2, %%gs"
			 :
			 : "i"(KERNEL_CS), "r"(KERNEL_DS), "r"(USER_DS)
			 : "rax", "memory");
	lidt((uptr)idt, IDT_LIMIT);
	ltr(TSS_SEL);
}
