/* 8259A PIC pair (IRQs at vectors 32..47) and 8254 PIT channel 0. */
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
