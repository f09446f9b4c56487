/* Trap dispatch: system calls, the timer, page faults, #DE, and the rest. */
#include "kernel.h"

volatile uptr probe_pf_active, probe_pf_cr2, probe_pf_err, probe_pf_count;
volatile uptr probe_de_count, probe_de_eip, probe_de_vector;
#define PROBE_VA 0x60000000u

static const char *const names[] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
	"#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM",
};

static void __attribute__((noreturn)) unexpected(struct trapframe *tf, uptr cr2)
{
	const char *n = tf->vector < ARRAY_SIZE(names) ? names[tf->vector] : "trap";
	if (tf_from_user(tf)) {
		kprintf("minios: pid %u killed: %s (vector %lu) err=%lx ip=%lx cr2=%lx cs=%lx sp=%lx "
			"flags=%lx\n",
			current->pid, n, tf->vector, tf->err, tf->ip, cr2, tf->cs, tf->sp, tf->flags);
		proc_exit(-(s32)tf->vector - 1);
	}
	panic("%s (vector %lu) in kernel: err=%lx ip=%lx cs=%lx flags=%lx cr2=%lx ax=%lx bx=%lx "
	      "cx=%lx dx=%lx si=%lx di=%lx bp=%lx",
	      n, tf->vector, tf->err, tf->ip, tf->cs, tf->flags, cr2, tf->ax, tf->bx, tf->cx, tf->dx,
	      tf->si, tf->di, tf->bp);
}

u32 stat_syscall_faults;

static void page_fault(struct trapframe *tf)
{
	uptr cr2 = read_cr2();
	/* x86-64: a SYSCALL that reached LSTAR still at CPL 3 (arch.h). */
	if (tf_from_user(tf) && arch_syscall_fault(tf, cr2)) {
		if (!stat_syscall_faults++)
			kprintf("minios: SYSCALL from ring 3 reached LSTAR still at CPL 3 (a #PF on "
				"the entry page): the kernel completes system calls from its #PF "
				"handler\n");
		syscall(tf);
		return;
	}
	/* The self-check probe: record, then map the page so the access retries. */
	if (probe_pf_active && (cr2 & PAGE_MASK) == PROBE_VA) {
		probe_pf_cr2 = cr2;
		probe_pf_err = tf->err;
		probe_pf_count++;
		uptr pa = page_alloc();
		if (!pa || map_page(active_pd, PROBE_VA, pa, PTE_W))
			panic("probe: out of memory");
		return;
	}
	/* Demand paging of the heap and the stack (from ring 3, or from the
	 * kernel copying to or from user memory). */
	if (!(tf->err & 1) && current->pid && demand_fault(cr2))
		return;
	unexpected(tf, cr2);
}

static void divide_error(struct trapframe *tf)
{
	if (!tf_from_user(tf) && tf->ip == (uptr)de_probe_insn) {
		probe_de_count++;
		probe_de_eip = tf->ip;
		probe_de_vector = tf->vector;
		tf->ip = (uptr)de_probe_resume;
		return;
	}
	if (tf_from_user(tf) && current->de_resume) {
		/* Deliver the #DE back to the program: resume at its handler. */
		tf->ip = current->de_resume;
		return;
	}
	unexpected(tf, 0);
}

void trap(struct trapframe *tf)
{
	uptr v = tf->vector;
	if (v == T_SYSCALL) {
		syscall(tf);
	} else if (v == 32) {
		jiffies++;
		pic_eoi(0);
		if (tf_from_user(tf)) {
			u32 before = stat_switches;
			schedule(); /* round robin: a quantum is one tick */
			if (stat_switches != before)
				stat_preemptions++;
		}
	} else if (v > 32 && v < 48) {
		/* Only COM1 is also unmasked (the `wait` mode); spurious IRQ
		 * 7/15 need no EOI. */
		if (v == 36)
			console_irq();
		if (v == 33)
			irq_bench_pic();
		if (v != 39 && v != 47)
			pic_eoi(v - 32);
	} else if (v == IRQ_BENCH_VECTOR) {
		irq_bench_apic();
	} else if (v == 14) {
		page_fault(tf);
	} else if (v == 0) {
		divide_error(tf);
	} else {
		unexpected(tf, 0);
	}
}
