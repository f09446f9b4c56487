/* 8259A PIC pair (IRQs at vectors 32..47), 8254 PIT channel 0, and the TSC
 * calibration against PIT channel 2. */
#include "kernel.h"

void pic_init(void)
{
	outb(0x20, 0x11); outb(0xa0, 0x11);   /* ICW1: edge, cascade, ICW4 */
	outb(0x21, 0x20); outb(0xa1, 0x28);   /* ICW2: vector offsets */
	outb(0x21, 0x04); outb(0xa1, 0x02);   /* ICW3: slave on IRQ2 */
	outb(0x21, 0x01); outb(0xa1, 0x01);   /* ICW4: 8086 mode */
	outb(0x21, 0xff); outb(0xa1, 0xff);   /* everything masked */
}

void pic_eoi(u32 irq)
{
	if (irq >= 8)
		outb(0xa0, 0x20);
	outb(0x20, 0x20);
}

void pit_init(u32 hz)
{
	u32 div = 1193182 / hz;
	outb(0x43, 0x34); /* channel 0, lo/hi, mode 2 (rate generator) */
	outb(0x40, (u8)div);
	outb(0x40, (u8)(div >> 8));
	outb(0x21, 0xfe); /* unmask IRQ 0 only */
}

/*
 * The TSC's rate, measured against the PIT as Linux's pit_calibrate_tsc()
 * does: counter 2 in mode 0 counts CAL_LATCH ticks of the 1.193182 MHz clock
 * (its gate is port 0x61 bit 0, the speaker stays off), and OUT2 (port 0x61
 * bit 5) goes high when it reaches 0. The TSC cycles in between give the
 * rate. Runs with interrupts off, before the timer starts; with -DPARAVIRT
 * the port accesses are hypercalls.
 */
#define PIT_HZ 1193182u
#define CAL_MS 10u
#define CAL_LATCH (PIT_HZ * CAL_MS / 1000u)
#define CAL_MAX_POLLS 50000000u
#define CAL_RUNS 3

u32 tsc_khz;

/* TSC cycles of one CAL_LATCH count of counter 2; 0 if OUT2 never rose. */
static u64 tsc_cycles_of_pit_count(void)
{
	outb(0x61, (u8)((inb(0x61) & ~0x02u) | 0x01u)); /* gate on, speaker off */
	outb(0x43, 0xb0);                                /* counter 2, lo/hi, mode 0, binary */
	outb(0x42, (u8)CAL_LATCH);
	outb(0x42, (u8)(CAL_LATCH >> 8));
	u64 t0 = rdtsc();
	u32 polls = 0;
	while (!(inb(0x61) & 0x20) && ++polls < CAL_MAX_POLLS)
		;
	u64 t1 = rdtsc();
	outb(0x61, (u8)(inb(0x61) & ~0x03u)); /* gate off */
	return polls >= CAL_MAX_POLLS || t1 <= t0 ? 0 : t1 - t0;
}

void tsc_calibrate(void)
{
	/* A late poll (a VM exit that took long, a host that preempted us) only
	 * ever makes a measurement longer: keep the shortest of a few. */
	u64 best = 0;
	for (int i = 0; i < CAL_RUNS; i++) {
		u64 c = tsc_cycles_of_pit_count();
		if (c && (!best || c < best))
			best = c;
	}
	if (!best) {
		kprintf("minios: tsc calibration failed (PIT counter 2 OUT never rose)\n");
		return;
	}
	/* kHz = cycles / (CAL_LATCH / PIT_HZ s) / 1000 */
	tsc_khz = (u32)udivmod64(best * PIT_HZ, (u64)CAL_LATCH * 1000u, NULL);
	kprintf("minios: tsc MHz=%u.%03u (against PIT counter 2: shortest of %u runs of %u ms)\n",
		tsc_khz / 1000, tsc_khz % 1000, CAL_RUNS, CAL_MS);
}
