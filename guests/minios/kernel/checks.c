/*
 * Self-checks: what the kernel can observe of its CPU, run before the timer
 * and the scheduler start. Each prints "minios: check NAME ok" or
 * "minios: check NAME FAILED got X want Y". The native checks include the
 * x86-gap instructions (a kernel deprivileged without binary translation or
 * hardware assist fails them); the paravirtual build checks the hypercall
 * interface instead and uses no gap instruction.
 */
#include "kernel.h"

#define PROBE_VA 0x60000000u
#define MAX_FAILED 32

u32 nfailures;
static const char *failed[MAX_FAILED];

void check(const char *name, uptr got, uptr want)
{
	if (got == want) {
		kprintf("minios: check %s ok\n", name);
		return;
	}
	kprintf("minios: check %s FAILED got 0x%lx want 0x%lx\n", name, got, want);
	if (nfailures < MAX_FAILED)
		failed[nfailures] = name;
	nfailures++;
}

#ifndef PARAVIRT
struct __attribute__((packed)) dt {
	u16 limit;
	uptr base; /* 32 or 64 bits, as SGDT/SIDT store it */
};

static void checks_native(void)
{
	u32 cs, ss, v;
	uptr f, inner;
	__asm__ volatile("movl %%cs, %0" : "=r"(cs));
	__asm__ volatile("movl %%ss, %0" : "=r"(ss));
	check("cpl", cs & 3, 0);
	check("ss_rpl", ss & 3, 0);

	/* Interrupts: the PIC masks every line, so IF=1 is harmless here. */
	irq_disable();
	check("if_pushf_after_cli", arch_local_save_flags() & EFLAGS_IF, 0);
	irq_enable();
	check("if_pushf_after_sti", arch_local_save_flags() & EFLAGS_IF, EFLAGS_IF);
	f = arch_local_irq_save(); /* pushf; cli */
	inner = arch_local_save_flags();
	arch_local_irq_restore(f); /* push; popf */
	check("if_irq_save", inner & EFLAGS_IF, 0);
	check("if_cli_popf", arch_local_save_flags() & EFLAGS_IF, EFLAGS_IF);
	arch_local_irq_restore(f & ~EFLAGS_IF);
	check("if_popf_clear", arch_local_save_flags() & EFLAGS_IF, 0);
	check("pushf_iopl", (arch_local_save_flags() & EFLAGS_IOPL) >> 12, 0);

	struct dt d;
	__asm__ volatile("sgdt %0" : "=m"(d));
	check("sgdt_base", d.base, (uptr)gdt);
	check("sgdt_limit", d.limit, GDT_LIMIT);
	__asm__ volatile("sidt %0" : "=m"(d));
	check("sidt_base", d.base, (uptr)idt);
	check("sidt_limit", d.limit, IDT_LIMIT);
	v = 0xffff;
	__asm__ volatile("str %w0" : "+r"(v));
	check("str", v & 0xffff, TSS_SEL);
	v = 0xffff;
	__asm__ volatile("sldt %w0" : "+r"(v));
	check("sldt", v & 0xffff, 0);
	v = 0;
	__asm__ volatile("smsw %w0" : "+r"(v));
	check("smsw", v & 0xffff, read_cr0() & 0xffff);
	u32 ok = 0;
	v = 0;
	__asm__ volatile("larl %2, %0; setz %b1" : "+r"(v), "+q"(ok) : "r"((u32)KERNEL_CS) : "cc");
	/* Present, DPL 0, code, readable (accessed bit ignored); G, D. */
	check("lar_kernel_cs", ok ? v & 0x00f0fe00 : 0xffffffff, LAR_KERNEL_CS);
	check("cr4_tsd", read_cr4() & 4, 0);
	check("acpi_s5", (u32)acpi.found, 1);
}
#else
static void checks_pv(void)
{
	check("hc_version", (u32)hypercall0(HC_VERSION), HC_ABI_VERSION);
	check("hc_enosys", (u32)hypercall0(0x7fff), (u32)-HC_ENOSYS);
	check("hc_einval", (u32)hypercall2(HC_PORT_IN, 0x3f8, 3), (u32)-HC_EINVAL);
	check("hc_efault", (u32)hypercall2(HC_CONSOLE_WRITE, 0xfffff000u, 16), (u32)-HC_EFAULT);
	check("hc_read_cr3", read_cr3(), kernel_pd);
#ifdef PV_SHIM
	check("shim_acpi_s5", (u32)acpi.found, 1);
#endif

	irq_disable();
	check("pv_irq_disable", arch_local_save_flags() & EFLAGS_IF, 0);
	irq_enable();
	check("pv_irq_enable", arch_local_save_flags() & EFLAGS_IF, EFLAGS_IF);
	uptr f = arch_local_irq_save();
	uptr inner = arch_local_save_flags();
	arch_local_irq_restore(f);
	check("pv_irq_save", inner & EFLAGS_IF, 0);
	check("pv_irq_restore", arch_local_save_flags() & EFLAGS_IF, EFLAGS_IF);
	arch_local_irq_restore(0);
	check("pv_irq_restore_clear", arch_local_save_flags() & EFLAGS_IF, 0);
}
#endif

static void checks_paging(void)
{
	volatile u32 *p = (volatile u32 *)(PROBE_VA + 4);
	probe_pf_active = 1;
	*p = 0x1234; /* not mapped: #PF, the handler maps it, the store retries */
	check("pf_count", probe_pf_count, 1);
	check("pf_cr2", probe_pf_cr2, PROBE_VA + 4);
	check("pf_err_write", probe_pf_err & 7, 2); /* not present, write, supervisor */
	check("pf_retry", *p, 0x1234);
	pte_t *pte = pte_lookup(active_pd, PROBE_VA, 0);
	*pte = 0; /* unmap: the page is leaked on purpose */
	flush_page(active_pd, PROBE_VA);
	u32 r = p[1];
	check("pf_err_read", probe_pf_err & 7, 0); /* not present, read, supervisor */
	check("pf_read_zero", r, 0);
	probe_pf_active = 0;

	/* Accessed and dirty bits of a fresh mapping. */
	uptr va = PROBE_VA + PAGE_SIZE;
	uptr pa = page_alloc();
	map_page(active_pd, va, pa, PTE_W);
	pte = pte_lookup(active_pd, va, 0);
	check("pte_fresh", *(volatile pte_t *)pte & (PTE_A | PTE_D), 0);
	r = *(volatile u32 *)va;
	check("pte_accessed", *(volatile pte_t *)pte & PTE_A, PTE_A);
	check("pte_clean_after_read", *(volatile pte_t *)pte & PTE_D, 0);
	*(volatile u32 *)va = r + 1;
	check("pte_dirty", *(volatile pte_t *)pte & PTE_D, PTE_D);
}

static void checks_exceptions(void)
{
	u32 r = de_probe();
	check("de_kernel", r, 1);
	check("de_vector", probe_de_vector, 0);
	check("de_eip", probe_de_eip, (uptr)de_probe_insn);
}

static void checks_lib(void)
{
	static const u8 want[32] = {
		0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
		0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
	};
	struct sha256 s;
	u8 out[32];
	sha256_init(&s);
	sha256_update(&s, "abc", 3);
	sha256_final(&s, out);
	check("sha256_abc", (u32)memcmp(out, want, 32), 0);
	u64 rem;
	u64 q = udivmod64(1000000000007ull, 1000, &rem);
	check("udiv64", (u32)q + (u32)(q >> 32), 1000000000u);
}

static void checks_user(void)
{
	for (int i = 0; i < NREP; i++)
		check_reports[i] = (s32)0xdeadbeef;
	s32 pid = proc_spawn(PROG_CHECK, 0, NULL);
	schedule(); /* no timer yet: runs until the program exits */
	s32 status = -1;
	s32 reaped = reap_child(NULL, &status);
	check("user_ran", (u32)reaped, (u32)pid);
	check("user_exit", (u32)status, 42);
	check("user_cpl", (u32)check_reports[REP_CPL], 3);
	check("user_getpid", (u32)check_reports[REP_GETPID], (u32)pid);
	check("user_sbrk", (u32)check_reports[REP_SBRK], PAGE_SIZE);
	check("user_demand_page", (u32)check_reports[REP_DEMAND], 0xabcd1234);
	check("user_de", (u32)check_reports[REP_DE], 3);
}

int run_checks(void)
{
#ifndef PARAVIRT
	checks_native();
#else
	checks_pv();
#endif
	checks_paging();
	checks_exceptions();
	checks_lib();
	checks_user();
#ifdef FAIL_CHECK
	check("deliberate_failure", 1, 0); /* build.sh test: proves failures exit 3 */
#endif
	if (!nfailures) {
		kprintf("minios: all checks passed\n");
		return 0;
	}
	char buf[200];
	int n = snprintf(buf, sizeof(buf), "minios: %u checks FAILED:", nfailures);
	for (u32 i = 0; i < nfailures && i < MAX_FAILED && n < (int)sizeof(buf) - 40; i++)
		n += snprintf(buf + n, sizeof(buf) - (u32)n, " %s", failed[i]);
	kprintf("%s\n", buf);
	return (int)nfailures;
}
