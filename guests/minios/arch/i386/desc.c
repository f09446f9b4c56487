/* GDT, IDT and TSS. */
#include "kernel.h"

struct tss {
	u32 link, esp0, ss0, esp1, ss1, esp2, ss2, cr3, eip, eflags;
	u32 eax, ecx, edx, ebx, esp, ebp, esi, edi;
	u32 es, cs, ss, ds, fs, gs, ldt;
	u16 trap, iomap_base;
	u8 iomap[8192 + 1]; /* one bit per port, 1 = ring 3 may not use it; 0xff terminator */
} __attribute__((packed));

u64 gdt[GDT_ENTRIES] __attribute__((aligned(8)));
u64 idt[IDT_QWORDS] __attribute__((aligned(8)));
struct tss tss __attribute__((aligned(128)));

static void set_desc(int i, u32 base, u32 limit, u8 access, u8 flags)
{
	u32 lo = (limit & 0xffff) | (base << 16);
	u32 hi = ((base >> 16) & 0xff) | ((u32)access << 8) | (limit & 0xf0000) | ((u32)flags << 20) |
		 (base & 0xff000000);
	gdt[i] = ((u64)hi << 32) | lo;
}

static void set_gate(int v, u32 off, u8 type)
{
	u32 lo = (off & 0xffff) | ((u32)KERNEL_CS << 16);
	u32 hi = (off & 0xffff0000) | ((u32)type << 8);
	idt[v] = ((u64)hi << 32) | lo;
}

void tss_set_kernel_stack(uptr esp0)
{
	/* A plain memory write: the CPU (or the VMM) reads SS0:ESP0 from the
	 * TSS on each ring 3 -> kernel transition. */
	tss.esp0 = (u32)esp0;
}

void desc_init(void)
{
	set_desc(0, 0, 0, 0, 0);
	set_desc(1, 0, 0xfffff, 0x9a, 0xc); /* KERNEL_CS: ring 0 code, 4 GiB */
	set_desc(2, 0, 0xfffff, 0x92, 0xc); /* KERNEL_DS: ring 0 data (SS) */
	set_desc(3, 0, 0xfffff, 0xfa, 0xc); /* USER_CS */
	set_desc(4, 0, 0xfffff, 0xf2, 0xc); /* USER_DS (also the kernel's DS/ES/FS/GS) */
	set_desc(5, (u32)&tss, sizeof(tss) - 1, 0x89, 0x0); /* available 32-bit TSS */

	memset(&tss, 0, sizeof(tss));
	tss.ss0 = KERNEL_DS;
	tss.iomap_base = (u16)__builtin_offsetof(struct tss, iomap);
	memset(tss.iomap, 0xff, sizeof(tss.iomap));
#ifndef PARAVIRT
	/* The "in" benchmark reads BENCH_PORT directly from ring 3. */
	tss.iomap[BENCH_PORT / 8] &= (u8)~(1u << (BENCH_PORT % 8));
#endif

	for (int v = 0; v < 256; v++)
		set_gate(v, (u32)trap_vectors + 16 * v, 0x8e); /* interrupt gate, DPL 0 */
	set_gate(0x80, (u32)trap_vectors + 16 * 0x80, 0xee); /* int 0x80 from ring 3 */

	lgdt((u32)gdt, GDT_LIMIT);
	/* Reload the segment registers from our GDT. Under `trap` these
	 * (boot-time only) loads of ring-0 selectors at ring 1 either fault
	 * and are emulated or hit the VMM's compressed descriptors. */
	__asm__ volatile("ljmp %0, $1f\n1:\n\t"
			 "movw %w1, %%ss\n\t"
			 "movw %w2, %%ds\n\tmovw %w2, %%es\n\t"
			 "movw %w2, %%fs\n\tmovw %w2, %%gs"
			 :
			 : "i"(KERNEL_CS), "r"(KERNEL_DS), "r"(USER_DS)
			 : "memory");
	lidt((u32)idt, IDT_LIMIT);
	ltr(TSS_SEL);
}
