/*
 * Test-only (build flavour minios-pvshim, -DPARAVIRT -DPV_SHIM): a stand-in
 * for popek's side of the hypercall ABI, inside the guest, doing natively
 * what the VMM would do. It lets the paravirtual kernel's own logic run on
 * any PC (QEMU) before a popek engine implements the host side. It follows
 * docs/hypercalls.md, including the error returns.
 */
#if defined(PARAVIRT) && defined(PV_SHIM)
#include "kernel.h"

static inline uptr n_flags(void) { uptr f; __asm__ volatile("pushf; pop %0" : "=r"(f)); return f; }
static inline void n_outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline void n_outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void n_outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 n_inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 n_inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 n_inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
struct __attribute__((packed)) ndtr { u16 limit; uptr base; };

static int shim_acpi_done;

s32 pv_shim_call(u32 nr, uptr a, uptr b, uptr c, uptr d)
{
	(void)d;
	u32 f = (u32)(n_flags() & EFLAGS_IF);
	switch (nr) {
	case HC_VERSION:
		if (!shim_acpi_done) { /* the VMM knows its power-off port */
			shim_acpi_done = 1;
			acpi_init();
		}
		return HC_ABI_VERSION;
	case HC_CONSOLE_WRITE:
		uptr limit = ram_top ? ram_top : 64u << 20; /* ram_top: known after mmu_init */
		if (a + b < a || a + b > limit)
			return -HC_EFAULT;
		if (b > 65536)
			return -HC_EINVAL;
		for (uptr i = 0; i < b; i++) {
			for (int k = 0; k < 100000 && !(n_inb(0x3fd) & 0x20); k++)
				;
			n_outb(0x3f8, ((const u8 *)a)[i]);
		}
		return (s32)b;
	case HC_EXIT:
		n_outb(0xf4, (u8)a);
		for (;;)
			;
	case HC_POWER_OFF:
		acpi_power_off();
		for (int i = 0; i < 100; i++)
			__asm__ volatile("sti; hlt; cli");
		n_outb(0xf4, 0);
		for (;;)
			;
	case HC_IRQ_DISABLE: __asm__ volatile("cli"); return (s32)f;
	case HC_IRQ_ENABLE: __asm__ volatile("sti"); return (s32)f;
	case HC_SAVE_FL: return (s32)f;
	case HC_RESTORE_FL:
		if (a & EFLAGS_IF)
			__asm__ volatile("sti");
		else
			__asm__ volatile("cli");
		return 0;
	case HC_HALT: __asm__ volatile("sti; hlt"); return 0;
	case HC_WRITE_CR3: {
		if (a & 0xfff)
			return -HC_EINVAL;
		uptr cr0;
		__asm__ volatile("mov %0, %%cr3" : : "r"(a) : "memory");
		__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
		if (!(cr0 & 0x80000000u))
			__asm__ volatile("mov %0, %%cr0" : : "r"(cr0 | 0x80000000u) : "memory");
		return 0;
	}
	case HC_READ_CR3: { uptr v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return (s32)v; }
	case HC_READ_CR2: { uptr v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return (s32)v; }
	case HC_INVLPG: __asm__ volatile("invlpg (%0)" : : "r"(a) : "memory"); return 0;
	case HC_LOAD_GDT:
	case HC_LOAD_IDT: {
		if (b > 0xffff)
			return -HC_EINVAL;
		struct ndtr t = { (u16)b, a };
		if (nr == HC_LOAD_GDT)
			__asm__ volatile("lgdt %0" : : "m"(t));
		else
			__asm__ volatile("lidt %0" : : "m"(t));
		return 0;
	}
	case HC_LOAD_TR: __asm__ volatile("ltr %w0" : : "r"(a)); return 0;
	case HC_PORT_IN:
		if (a > 0xffff || (b != 1 && b != 2 && b != 4))
			return -HC_EINVAL;
		return b == 1 ? n_inb((u16)a) : b == 2 ? n_inw((u16)a) : (s32)n_inl((u16)a);
	case HC_PORT_OUT:
		if (a > 0xffff || (b != 1 && b != 2 && b != 4))
			return -HC_EINVAL;
		if (b == 1)
			n_outb((u16)a, (u8)c);
		else if (b == 2)
			n_outw((u16)a, (u16)c);
		else
			n_outl((u16)a, (u32)c);
		return 0;
	default:
		return -HC_ENOSYS;
	}
}
#endif
