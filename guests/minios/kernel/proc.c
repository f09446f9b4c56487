/* Processes, the round-robin scheduler and the system calls. */
#include "kernel.h"

struct proc procs[NPROC];
struct proc *current;
u32 jiffies;
u32 stat_preemptions, stat_switches;
s32 check_reports[NREP];
static u32 next_pid = 1;
static struct proc *init_proc; /* its exit ends the machine */

/* The ring-3 programs (user/). */
extern void prog_init(u32), prog_check(u32), prog_spin(u32), prog_bench(u32), prog_null(u32);
extern char user_exit_trampoline[];
static void (*const programs[NPROGS])(u32) = {
	[PROG_INIT] = prog_init, [PROG_CHECK] = prog_check, [PROG_SPIN] = prog_spin,
	[PROG_BENCH] = prog_bench, [PROG_NULL] = prog_null,
};

static uptr kstack_top(struct proc *p) { return (uptr)(p->kstack + sizeof(p->kstack)); }

void proc_init(void)
{
	/* procs[0] is the idle context: the boot stack, the kernel page directory. */
	current = &procs[0];
	current->pid = 0;
	current->state = P_RUNNING;
	current->pd = kernel_pd;
}

s32 proc_spawn(u32 prog, u32 arg, struct proc *parent)
{
	if (prog >= NPROGS)
		return -1;
	struct proc *p = NULL;
	for (int i = 1; i < NPROC; i++)
		if (procs[i].state == P_UNUSED) {
			p = &procs[i];
			break;
		}
	if (!p)
		return -1;
	uptr pd = pd_create();
	if (!pd)
		return -1;
	uptr stack = page_alloc();
	if (!stack || map_page(pd, USER_STACK_TOP - PAGE_SIZE, stack, PTE_W | PTE_U)) {
		if (stack)
			page_free(stack);
		pd_destroy(pd);
		return -1;
	}
	p->pid = next_pid++;
	p->pd = pd;
	p->brk = USER_HEAP;
	p->de_resume = 0;
	p->parent = parent;
	p->exit_code = 0;

	/* The kernel stack: a trap frame to IRET to ring 3, under it the return
	 * address of swtch (trapret) and the callee-saved registers it pops. */
	uptr sp = kstack_top(p) - sizeof(struct trapframe);
	struct trapframe *tf = (struct trapframe *)sp;
	memset(tf, 0, sizeof(*tf));
	tf->cs = USER_CS;
	tf->flags = EFLAGS_IF | 0x2;
	tf->ss = USER_DS;
	/* The user stack: entry(arg), returning into a trampoline that calls exit. */
	arch_user_entry(tf, (uptr)programs[prog], stack, arg, (uptr)user_exit_trampoline);
	sp -= sizeof(uptr);
	*(uptr *)sp = (uptr)trapret;
	sp -= SWTCH_REGS * sizeof(uptr);
	memset((void *)sp, 0, SWTCH_REGS * sizeof(uptr));
	p->ctx = sp;
	p->state = P_RUNNABLE;
	if (prog == PROG_INIT && !init_proc)
		init_proc = p;
	return (s32)p->pid;
}

/* Round robin over the process table; the idle context runs when nobody else
 * can. Called with interrupts disabled (the kernel always runs so). */
void schedule(void)
{
	struct proc *prev = current, *next = NULL;
	int start = (int)(prev - procs);
	for (int i = 1; i <= NPROC; i++) {
		struct proc *p = &procs[(start + i) % NPROC];
		if (p != &procs[0] && p->state == P_RUNNABLE) {
			next = p;
			break;
		}
	}
	if (!next)
		next = prev->state == P_RUNNING ? prev : &procs[0];
	if (next == prev)
		return;
	if (prev->state == P_RUNNING)
		prev->state = prev == &procs[0] ? P_RUNNING : P_RUNNABLE;
	next->state = P_RUNNING;
	current = next;
	stat_switches++;
	if (next != &procs[0])
		tss_set_kernel_stack(kstack_top(next));
	switch_pd(next->pd);
	swtch(&prev->ctx, next->ctx);
}

s32 reap_child(struct proc *parent, s32 *status)
{
	for (int i = 1; i < NPROC; i++) {
		struct proc *p = &procs[i];
		if (p->state == P_ZOMBIE && p->parent == parent) {
			if (status)
				*status = p->exit_code;
			pd_destroy(p->pd);
			p->state = P_UNUSED;
			return (s32)p->pid;
		}
	}
	return -1;
}

static int has_children(struct proc *parent)
{
	for (int i = 1; i < NPROC; i++)
		if (procs[i].state != P_UNUSED && procs[i].parent == parent)
			return 1;
	return 0;
}

void proc_exit(s32 code)
{
	struct proc *p = current;
	if (p == init_proc) {
		if (stat_syscall_faults)
			kprintf("minios: %u system calls came through the #PF at LSTAR\n",
				stat_syscall_faults);
		if (code == 0) {
			kprintf("minios: init exited 0, powering off\n");
			machine_power_off();
		}
		kprintf("minios: init exited %d\n", code);
		machine_exit_failure(1);
	}
	for (int i = 1; i < NPROC; i++)
		if (procs[i].state != P_UNUSED && procs[i].parent == p)
			procs[i].parent = NULL; /* orphans: the idle loop reaps them */
	p->exit_code = code;
	p->state = P_ZOMBIE;
	if (p->parent && p->parent->state == P_WAITING)
		p->parent->state = P_RUNNABLE;
	schedule();
	panic("a zombie ran");
}

int demand_fault(uptr va)
{
	struct proc *p = current;
	int heap = va >= USER_HEAP && va < p->brk;
	int stack = va >= USER_STACK_TOP - USER_STACK_MAX && va < USER_STACK_TOP;
	if (!heap && !stack)
		return 0;
	uptr pa = page_alloc();
	if (!pa)
		return 0;
	if (map_page(p->pd, va & PAGE_MASK, pa, PTE_W | PTE_U)) {
		page_free(pa);
		return 0;
	}
	return 1;
}

void timer_start(void) { pit_init(TIMER_HZ); }

/* May the kernel access [va, va + n) on behalf of the current process?
 * Writable: the heap below the break and the stack; readable also the image. */
static int user_range_ok(uptr va, uptr n, int write)
{
	uptr end = va + n;
	if (end < va)
		return 0;
	if (va >= USER_HEAP && end <= current->brk)
		return 1;
	if (va >= USER_STACK_TOP - USER_STACK_MAX && end <= USER_STACK_TOP)
		return 1;
	return !write && va >= (uptr)__user_start && end <= (uptr)__user_end;
}

static s32 sys_write(uptr buf, uptr len)
{
	char kbuf[256];
	if (!user_range_ok(buf, len, 0))
		return -HC_EFAULT;
	for (uptr done = 0; done < len;) {
		uptr n = len - done < sizeof(kbuf) ? len - done : sizeof(kbuf);
		memcpy(kbuf, (const void *)(buf + done), n);
		console_write(kbuf, n);
		done += n;
	}
	return (s32)len;
}

static s32 sys_wait(uptr status_ptr)
{
	if (status_ptr && !user_range_ok(status_ptr, 4, 1))
		return -HC_EFAULT;
	for (;;) {
		s32 status;
		s32 pid = reap_child(current, &status);
		if (pid > 0) {
			if (status_ptr)
				*(s32 *)status_ptr = status;
			return pid;
		}
		if (!has_children(current))
			return -1;
		current->state = P_WAITING;
		schedule();
	}
}

static s32 sys_ptemod(uptr va)
{
	if (va < USER_HEAP || va >= USER_STACK_TOP)
		return -HC_EINVAL;
	pte_t *pte = pte_lookup(current->pd, va, 0);
	if (!pte || !(*pte & PTE_P))
		return -HC_EINVAL;
	*pte ^= PTE_W;
	flush_page(current->pd, va & PAGE_MASK);
	return (s32)(*pte & 0xfff);
}

static s32 sys_sbrk(s32 incr)
{
	uptr old = current->brk;
	if (incr < 0 || old + (uptr)incr > USER_HEAP + USER_HEAP_MAX)
		return -1;
	current->brk = old + (uptr)incr;
	return (s32)old;
}

void syscall(struct trapframe *tf)
{
	uptr a = SYSCALL_ARG0(tf), b = SYSCALL_ARG1(tf);
	s32 r;
	switch (tf->ax) {
	case SYS_EXIT: proc_exit((s32)a);
	case SYS_WRITE: r = sys_write(a, b); break;
	case SYS_GETPID: r = (s32)current->pid; break;
	case SYS_YIELD: schedule(); r = 0; break;
	case SYS_SBRK: r = sys_sbrk((s32)a); break;
	case SYS_SPAWN: r = proc_spawn((u32)a, (u32)b, current); break;
	case SYS_WAIT: r = sys_wait(a); break;
	case SYS_TICKS: r = (s32)jiffies; break;
	case SYS_PTEMOD: r = sys_ptemod(a); break;
	case SYS_SETDE:
		current->de_resume = a;
		r = 0;
		break;
	case SYS_INB: r = a == BENCH_PORT ? inb((u16)a) : -HC_EINVAL; break;
	case SYS_REPORT:
		if (a < NREP)
			check_reports[a] = (s32)b;
		r = a < NREP ? 0 : -HC_EINVAL;
		break;
	case SYS_IRQBENCH: r = (s32)irq_bench(a, b); break;
	case SYS_STAT:
		r = a == STAT_PREEMPTIONS ? (s32)stat_preemptions
		  : a == STAT_SWITCHES	  ? (s32)stat_switches
		  : a == STAT_TSC_KHZ	  ? (s32)tsc_khz
					  : -HC_EINVAL;
		break;
	default: r = -HC_ENOSYS; break;
	}
	tf->ax = (uptr)(sptr)r;
}
