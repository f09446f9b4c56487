/*
 * The ring-3 programs: init, the self-check program, the scheduler demo and
 * the null program of the forkwait benchmark. They use no writable globals
 * (the image is mapped read-only into every process): state lives on the
 * stack and in the heap.
 */
#include "usys.h"

void prog_init(u32 arg);
void prog_check(u32 arg);
void prog_spin(u32 arg);
void prog_null(u32 arg);

#define SPIN_PROCS 3
#define SPIN_ROUNDS 3
#define SPIN_TICKS 3

/* pid 1: the scheduler demo, then each benchmark; exit 0 powers off. */
void prog_init(u32 arg)
{
	(void)arg;
	s32 st, failed = 0;
	uprintf("minios: init: scheduler demo, %d processes\n", SPIN_PROCS);
	for (u32 k = 0; k < SPIN_PROCS; k++)
		if (u_spawn(PROG_SPIN, k) < 0)
			failed++;
	for (u32 k = 0; k < SPIN_PROCS; k++)
		if (u_wait(&st) < 0 || st != 0)
			failed++;
	s32 pre = u_stat(STAT_PREEMPTIONS), sw = u_stat(STAT_SWITCHES);
	if (failed || pre < SPIN_PROCS) {
		uprintf("minios: sched FAILED preemptions=%d switches=%d failures=%d\n", pre, sw, failed);
		u_exit(1);
	}
	uprintf("minios: sched ok preemptions=%d switches=%d\n", pre, sw);
	for (u32 b = 0; b < NBENCH; b++) {
		if (u_spawn(PROG_BENCH, b) < 0 || u_wait(&st) < 0 || st != 0) {
			uprintf("minios: bench %u FAILED status=%d\n", b, st);
			u_exit(2);
		}
	}
	u_exit(0);
}

/* The self-check program (run before the timer starts): reports what it
 * sees through SYS_REPORT and exits 42. */
void prog_check(u32 arg)
{
	(void)arg;
	u32 cs;
	__asm__ volatile("movl %%cs, %0" : "=r"(cs));
	u_report(REP_CPL, cs & 3);
	u_report(REP_GETPID, (u32)u_getpid());
	uptr old = u_sbrk(4096);
	u_report(REP_SBRK, (u32)(u_sbrk(0) - old));
	volatile u32 *p = (volatile u32 *)old;
	*p = 0xabcd1234; /* demand-paged */
	u_report(REP_DEMAND, *p);
	u_setde(u_divzero_resume);
	u_report(REP_DE, u_divzero_loop(3));
	u_exit(42);
}

/* The scheduler demo: SPIN_ROUNDS rounds of a progress line and a busy wait
 * of SPIN_TICKS timer ticks that never yields, so only preemption lets the
 * other processes run. arg 0 spins on pure computation (checking the clock
 * every 4096 steps), arg 1 polls the tick count, arg 2 computes sha256. */
void prog_spin(u32 kind)
{
	static const char *const kinds[] = { "compute-loop", "tick-poll", "sha256-loop" };
	s32 pid = u_getpid();
	volatile u32 x = 1;
	u8 block[64], digest[32];
	memset(block, (int)kind, sizeof(block));
	for (u32 r = 0; r < SPIN_ROUNDS; r++) {
		uprintf("minios: proc %d (%s) round %u of %d\n", pid, kinds[kind % 3], r + 1, SPIN_ROUNDS);
		u32 t0 = u_ticks();
		while (u_ticks() - t0 < SPIN_TICKS) {
			if (kind == 0) {
				for (u32 i = 0; i < 4096; i++)
					x = x * 1103515245u + 12345u;
			} else if (kind == 2) {
				struct sha256 s;
				sha256_init(&s);
				sha256_update(&s, block, sizeof(block));
				sha256_final(&s, digest);
				block[0] = digest[0];
			}
		}
	}
	uprintf("minios: proc %d done\n", pid);
	u_exit(0);
}

void prog_null(u32 arg)
{
	u_exit((s32)arg);
}
