/*
 * x86-64 CPU operations. Every sensitive or privileged operation of the kernel
 * goes through this file: natively it is the instruction, with -DPARAVIRT it
 * is a hypercall (include/hypercall.h), so the PV kernel contains no
 * privileged instruction and depends on none of the x86-gap instructions.
 */
#ifndef MINIOS_CPU_H
#define MINIOS_CPU_H

#include "types.h"
#include "hypercall.h"

#define EFLAGS_IF 0x200u
#define EFLAGS_IOPL 0x3000u

#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
/* User data below user code: SYSRET loads SS = STAR[63:48] + 8 and
 * CS = STAR[63:48] + 16 (both | 3), so the pair must be in that order. */
#define USER_DS 0x1b  /* GDT index 3, RPL 3; also the kernel's DS/ES/FS/GS */
#define USER_CS 0x23  /* GDT index 4, RPL 3 */
#define TSS_SEL 0x28

#define PTE_P 0x001u
#define PTE_W 0x002u
#define PTE_U 0x004u
#define PTE_A 0x020u
#define PTE_D 0x040u
#define PAGE_SIZE 4096u
#define PAGE_MASK 0xfffff000u /* kernel addresses are below 4 GiB */
#define PTE_ADDR 0x000ffffffffff000ull

#ifndef PARAVIRT

static inline uptr arch_local_save_flags(void)
{
	uptr f;
	__asm__ volatile("pushfq; popq %0" : "=rm"(f) : : "memory");
	return f;
}
/* Linux's local_irq_save: pushf; cli. */
static inline uptr arch_local_irq_save(void)
{
	uptr f;
	__asm__ volatile("pushfq; popq %0; cli" : "=rm"(f) : : "memory");
	return f;
}
/* Linux's local_irq_restore: push; popf. */
static inline void arch_local_irq_restore(uptr f)
{
	__asm__ volatile("pushq %0; popfq" : : "rm"(f) : "memory", "cc");
}
static inline void irq_disable(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void irq_enable(void) { __asm__ volatile("sti" : : : "memory"); }
/* Enable interrupts and wait for one, atomically (STI's one-instruction shadow). */
static inline void safe_halt(void) { __asm__ volatile("sti; hlt" : : : "memory"); }

static inline void write_cr3(uptr pd) { __asm__ volatile("movq %0, %%cr3" : : "r"(pd) : "memory"); }
static inline uptr read_cr3(void) { uptr v; __asm__ volatile("movq %%cr3, %0" : "=r"(v)); return v; }
static inline uptr read_cr2(void) { uptr v; __asm__ volatile("movq %%cr2, %0" : "=r"(v)); return v; }
static inline uptr read_cr0(void) { uptr v; __asm__ volatile("movq %%cr0, %0" : "=r"(v)); return v; }
static inline uptr read_cr4(void) { uptr v; __asm__ volatile("movq %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(uptr v) { __asm__ volatile("movq %0, %%cr0" : : "r"(v) : "memory"); }
static inline void invlpg(uptr va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }
/* Long mode is on since entry.S: "enabling" paging is loading the new tables. */
static inline void enable_paging(uptr pd) { write_cr3(pd); }

#endif /* !PARAVIRT */

#include "cpu_ops.h"

#endif
