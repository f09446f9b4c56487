/* Boot: console, descriptors, PIC, paging, checks; then init and the scheduler. */
#include "kernel.h"

#ifdef PARAVIRT
const char *const flavour = ARCH_NAME " paravirtual";
#else
const char *const flavour = ARCH_NAME " native";
#endif

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u

void machine_exit_failure(u32 code)
{
#ifdef PARAVIRT
	hypercall1(HC_EXIT, code);
#else
	outb(0xf4, (u8)code); /* isa-debug-exit: the VM exits with (code << 1) | 1 */
#endif
	for (;;)
		safe_halt();
}

void machine_power_off(void)
{
#ifdef PARAVIRT
	hypercall0(HC_POWER_OFF);
#else
	acpi_power_off();
#endif
	/* A machine may take a moment to act on the request (QEMU does): give
	 * it up to 100 timer ticks (the timer runs by now) before giving up. */
	for (int i = 0; i < 100; i++) {
		safe_halt();
		irq_disable();
	}
	kprintf("minios: power-off failed\n");
	machine_exit_failure(0);
}

void panic(const char *fmt, ...)
{
	char buf[200];
	va_list ap;
	irq_disable();
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	kprintf("minios: PANIC: %s\n", buf);
	machine_exit_failure(2);
}

#ifdef PARAVIRT
/* No popek hypervisor answered: say so on COM1 directly (this path uses real
 * port I/O, it is the only one in the PV kernel) and leave through the
 * debug-exit port, status 5. */
static void __attribute__((noreturn)) no_hypervisor(s32 v)
{
	char buf[96];
	int n = snprintf(buf, sizeof(buf), "minios: no popek hypervisor (HC_VERSION returned %d)\n", v);
	for (int i = 0; i < n; i++)
		__asm__ volatile("outb %0, %1" : : "a"(buf[i]), "Nd"((u16)0x3f8));
	__asm__ volatile("outb %0, %1" : : "a"((u8)2), "Nd"((u16)0xf4));
	for (;;)
		;
}
#endif

/* True when the Multiboot command line contains `word`. */
static int cmdline_has(const u32 *mbi, const char *word)
{
	if (!(mbi[0] & (1u << 2)) || !mbi[4])
		return 0;
	const char *c = (const char *)(uptr)mbi[4];
	size_t n = strlen(word);
	for (; *c; c++)
		if (!memcmp(c, word, n))
			return 1;
	return 0;
}

void kmain(u32 magic, uptr mbi_addr)
{
	const u32 *mbi = (const u32 *)mbi_addr;
#ifdef PARAVIRT
	s32 v = hypercall0(HC_VERSION);
	if (v != HC_ABI_VERSION)
		no_hypervisor(v);
#endif
	console_init();
	kprintf("minios: booting (%s)\n", flavour);
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC)
		panic("not started by a Multiboot loader (EAX=%x)", magic);
	if (!(mbi[0] & 1))
		panic("the loader gave no memory size");
	uptr top = 0x100000 + (uptr)mbi[2] * 1024; /* mem_upper: KiB from 1 MiB */
#ifndef PARAVIRT
	acpi_init();
#endif
	desc_init();
	pic_init();
	tsc_calibrate();
	mmu_init(top);
	proc_init();
	kprintf("minios: memory %lu KiB, %u free pages, kernel end %p\n", top >> 10, pages_free(),
		__kernel_end);

	if (run_checks()) {
		if (!cmdline_has(mbi, "checks=continue"))
			machine_exit_failure(1);
		kprintf("minios: going on despite the failed checks (checks=continue)\n");
	}

	/* `wait`: an idle machine that answers the console (a guest to
	 * snapshot, restore and clone while it waits). */
	if (cmdline_has(mbi, "wait")) {
		timer_start();
		console_listen();
		kprintf("minios: waiting for input: each line is echoed, \"off\" powers off\n");
		for (;;) {
			safe_halt();
			irq_disable();
		}
	}

	/* init runs the scheduler demo and the benchmarks; its exit powers the
	 * machine off (see proc_exit). */
	if (proc_spawn(PROG_INIT, 0, NULL) < 0)
		panic("cannot start init");
	timer_start();
	for (;;) { /* the idle loop */
		schedule();
		while (reap_child(NULL, NULL) > 0) /* orphans */
			;
		safe_halt();
		irq_disable();
	}
}
