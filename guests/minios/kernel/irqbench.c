/*
 * The interrupt-delivery benchmark: n interrupts, each raised by the kernel,
 * delivered, handled (counted) and acknowledged, then the next one. Two
 * paths:
 *   - the 8259: the i8042's "write keyboard output buffer" command (0xD2)
 *     puts a byte in its output buffer, which raises IRQ 1; the handler
 *     reads it from port 0x60 and sends the PIC its EOI;
 *   - the local APIC: a self-IPI (fixed, vector IRQ_BENCH_VECTOR) through
 *     the ICR; the handler writes the APIC's EOI register.
 * The kernel spins with interrupts enabled until each one has come.
 * Returns the mean TSC cycles of a round trip (0: the path is not available:
 * the APIC one under -DPARAVIRT, whose kernel has no mapping of the APIC).
 */
#include "kernel.h"

static volatile u32 hits;

#define LAPIC_SVR 0xf0
#define LAPIC_EOI 0xb0
#define LAPIC_ICR_LO 0x300
#define ICR_SELF (1u << 18)
#define ICR_ASSERT (1u << 14)
#define SPIN_LIMIT 10000000u

static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(uptr)(LAPIC_VA + reg) = v; }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(uptr)(LAPIC_VA + reg); }

void irq_bench_pic(void)
{
	(void)inb(0x60);
	hits++;
}

void irq_bench_apic(void)
{
#ifndef PARAVIRT
	lapic_write(LAPIC_EOI, 0);
#endif
	hits++;
}

/* Waits with interrupts on for the i-th interrupt; false if it never came. */
static int wait_for(u32 i)
{
	u32 spins = 0;
	irq_enable();
	while (hits != i && ++spins < SPIN_LIMIT)
		__asm__ volatile("pause");
	irq_disable();
	return hits == i;
}

u32 irq_bench(u32 apic, u32 n)
{
	u64 t0, t1;
	u32 i;
	hits = 0;
	if (apic) {
#ifdef PARAVIRT
		return 0;
#else
		lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100); /* software enable */
		t0 = rdtsc();
		for (i = 1; i <= n; i++) {
			lapic_write(LAPIC_ICR_LO, ICR_SELF | ICR_ASSERT | IRQ_BENCH_VECTOR);
			if (!wait_for(i))
				return 0;
		}
		t1 = rdtsc();
#endif
	} else {
		u8 mask = inb(0x21);
		outb(0x21, mask & ~0x02); /* IRQ 1 */
		t0 = rdtsc();
		for (i = 1; i <= n; i++) {
			outb(0x64, 0xd2);
			outb(0x60, 0x5a);
			if (!wait_for(i)) {
				outb(0x21, mask);
				return 0;
			}
		}
		t1 = rdtsc();
		outb(0x21, mask);
	}
	u64 d = udivmod64(t1 - t0, n, NULL);
	return d > 0xffffffffu ? 0xffffffffu : (u32)d;
}
