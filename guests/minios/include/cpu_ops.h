/*
 * The CPU operations both architectures write alike: descriptor-table
 * loads and port I/O natively, and under -DPARAVIRT every sensitive
 * operation as a hypercall. Included by arch/<arch>/cpu.h after its own
 * operations.
 */
#ifndef MINIOS_CPU_OPS_H
#define MINIOS_CPU_OPS_H

#ifndef PARAVIRT

struct __attribute__((packed)) dtr {
	u16 limit;
	uptr base;
};
static inline void lgdt(uptr base, u16 limit)
{
	struct dtr d = { limit, base };
	__asm__ volatile("lgdt %0" : : "m"(d) : "memory");
}
static inline void lidt(uptr base, u16 limit)
{
	struct dtr d = { limit, base };
	__asm__ volatile("lidt %0" : : "m"(d) : "memory");
}
static inline void ltr(u16 sel) { __asm__ volatile("ltr %0" : : "r"(sel) : "memory"); }

static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }

#else /* PARAVIRT */

static inline uptr arch_local_save_flags(void) { return (u32)hypercall0(HC_SAVE_FL); }
static inline uptr arch_local_irq_save(void) { return (u32)hypercall0(HC_IRQ_DISABLE); }
static inline void arch_local_irq_restore(uptr f) { hypercall1(HC_RESTORE_FL, f & EFLAGS_IF); }
static inline void irq_disable(void) { hypercall0(HC_IRQ_DISABLE); }
static inline void irq_enable(void) { hypercall0(HC_IRQ_ENABLE); }
static inline void safe_halt(void) { hypercall0(HC_HALT); }

static inline void write_cr3(uptr pd) { hypercall1(HC_WRITE_CR3, pd); }
static inline uptr read_cr3(void) { return (u32)hypercall0(HC_READ_CR3); }
static inline uptr read_cr2(void) { return (u32)hypercall0(HC_READ_CR2); }
static inline void invlpg(uptr va) { hypercall1(HC_INVLPG, va); }
static inline void enable_paging(uptr pd) { hypercall1(HC_WRITE_CR3, pd); }
static inline void lgdt(uptr base, u16 limit) { hypercall2(HC_LOAD_GDT, base, limit); }
static inline void lidt(uptr base, u16 limit) { hypercall2(HC_LOAD_IDT, base, limit); }
static inline void ltr(u16 sel) { hypercall1(HC_LOAD_TR, sel); }

static inline u8 inb(u16 port) { return (u8)hypercall2(HC_PORT_IN, port, 1); }
static inline void outb(u16 port, u8 v) { hypercall3(HC_PORT_OUT, port, 1, v); }
static inline void outw(u16 port, u16 v) { hypercall3(HC_PORT_OUT, port, 2, v); }

#endif /* PARAVIRT */

#endif
