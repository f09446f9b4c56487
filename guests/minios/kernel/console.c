/* The console: COM1 16550 natively, HC_CONSOLE_WRITE paravirtualized. */
#include "kernel.h"

#define COM1 0x3f8

#ifndef PARAVIRT
void console_init(void)
{
	outb(COM1 + 1, 0x00); /* no UART interrupts: output is polled */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
	outb(COM1 + 4, 0x03); /* DTR, RTS */
}

static void serial_putc(char c)
{
	/* Wait for THR empty, but never forever. */
	for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		;
	outb(COM1, (u8)c);
}

void console_write(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		serial_putc(s[i]);
}
#else
void console_init(void) {}

void console_write(const char *s, size_t n)
{
	/* Kernel buffers are identity-mapped: virtual == guest-physical. */
	while (n) {
		s32 r = hypercall2(HC_CONSOLE_WRITE, (uptr)s, n);
		if (r <= 0)
			return;
		s += r;
		n -= (u32)r;
	}
}
#endif

/*
 * Console input (the `wait` command-line word): COM1's received-data
 * interrupt on IRQ 4; each line typed is echoed, and "off" powers off.
 * Port accesses are hypercalls with -DPARAVIRT, so both flavours listen.
 */
void console_listen(void)
{
	outb(COM1 + 1, 0x01);              /* IER: received data */
	outb(COM1 + 4, 0x0b);              /* DTR, RTS, OUT2 (the IRQ gate) */
	outb(0x21, inb(0x21) & ~(1u << 4)); /* unmask IRQ 4 */
}

void console_irq(void)
{
	static char line[80];
	static u32 len;
	while (inb(COM1 + 5) & 1) {
		char c = (char)inb(COM1);
		if (c != '\r' && c != '\n') {
			if (len < sizeof(line) - 1)
				line[len++] = c;
			continue;
		}
		if (!len)
			continue;
		line[len] = 0;
		kprintf("minios: line: %s\n", line);
		if (len == 3 && !memcmp(line, "off", 3))
			machine_power_off();
		len = 0;
	}
}

int kprintf(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 1)
		n = sizeof(buf) - 1;
	console_write(buf, (size_t)n);
	return n;
}
