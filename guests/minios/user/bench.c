/*
 * The micro-benchmarks, one per PROG_BENCH process. Each prints
 *   minios: bench NAME iters=N cycles_per_iter=C ns_per_iter=T
 * with C = TSC cycles / N (RDTSC at ring 3) and T the same in nanoseconds
 * (two decimals), converted with the TSC rate the kernel measured against
 * the PIT at boot (SYS_STAT STAT_TSC_KHZ; T is left out if that failed), and
 * exits 0 (non-zero on error).
 * Iteration counts are modest so that a slow software CPU finishes quickly.
 */
#include "usys.h"

void prog_bench(u32 which);

#define PAGE 4096u

static __attribute__((noinline)) u32 leaf(u32 x)
{
	__asm__ volatile("" : "+r"(x));
	return x + 1;
}

static void report(const char *name, u32 iters, u64 t0, u64 t1)
{
	u64 per = udivmod64(t1 - t0, iters, NULL);
	u32 khz = (u32)u_stat(STAT_TSC_KHZ);
	if ((s32)khz <= 0) {
		uprintf("minios: bench %s iters=%u cycles_per_iter=%llu\n", name, iters, per);
		return;
	}
	/* hundredths of a ns per iteration: cycles * 1e8 / (kHz * N) */
	u64 cns = udivmod64((t1 - t0) * 100000000ull, (u64)khz * iters, NULL);
	uprintf("minios: bench %s iters=%u cycles_per_iter=%llu ns_per_iter=%llu.%02llu\n", name,
		iters, per, udivmod64(cns, 100, NULL), cns - udivmod64(cns, 100, NULL) * 100);
}

void prog_bench(u32 which)
{
	u64 t0, t1;
	u32 n, i;
	s32 err = 0;
	switch (which) {
	case BENCH_SYSCALL: /* a null int 0x80 round trip */
		n = 10000;
		t0 = rdtsc();
		for (i = 0; i < n; i++)
			u_getpid();
		t1 = rdtsc();
		report("syscall", n, t0, t1);
		break;
	case BENCH_IN: /* a port read of an emulated device (COM1 LSR) */
		n = 10000;
		t0 = rdtsc();
		for (i = 0; i < n; i++) {
#ifdef PARAVIRT
			u_inb(BENCH_PORT); /* the PV kernel reads it by hypercall */
#else
			u8 v;
			__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"((u16)BENCH_PORT));
#endif
		}
		t1 = rdtsc();
		report("in", n, t0, t1);
		break;
	case BENCH_CALLRET: /* a call and a return */
		n = 100000;
		u32 x = 0;
		t0 = rdtsc();
		for (i = 0; i < n; i++)
			x = leaf(x);
		t1 = rdtsc();
		err = x != n;
		report("callret", n, t0, t1);
		break;
	case BENCH_PAGEFAULT: { /* touch a fresh page, mapped on demand */
		n = 1000;
		volatile u32 *p = (volatile u32 *)u_sbrk(n * PAGE);
		t0 = rdtsc();
		for (i = 0; i < n; i++)
			p[i * (PAGE / 4)] = i;
		t1 = rdtsc();
		report("pagefault", n, t0, t1);
		break;
	}
	case BENCH_PTEMOD: { /* change a PTE and INVLPG, via a system call */
		n = 5000;
		volatile u32 *p = (volatile u32 *)u_sbrk(PAGE);
		*p = 1;
		t0 = rdtsc();
		for (i = 0; i < n; i++)
			err |= u_ptemod((uptr)p) < 0;
		t1 = rdtsc();
		report("ptemod", n, t0, t1);
		break;
	}
	case BENCH_DIVZERO: /* a #DE delivered to the kernel and back to the user */
		n = 5000;
		u_setde(u_divzero_resume);
		t0 = rdtsc();
		u32 got = u_divzero_loop(n);
		t1 = rdtsc();
		err = got != n;
		report("divzero", n, t0, t1);
		break;
	case BENCH_FORKWAIT: /* create and reap a process */
		n = 200;
		t0 = rdtsc();
		for (i = 0; i < n; i++) {
			s32 st = -1;
			err |= u_spawn(PROG_NULL, 7) < 0;
			err |= u_wait(&st) < 0 || st != 7;
		}
		t1 = rdtsc();
		report("forkwait", n, t0, t1);
		break;
	case BENCH_IRQ_PIC:  /* raise, deliver, handle and EOI an interrupt: */
	case BENCH_IRQ_APIC: /* through the 8259 or the local APIC */
		n = 2000;
		t1 = (u64)u_irqbench(which == BENCH_IRQ_APIC, n) * n;
		if (t1)
			report(which == BENCH_IRQ_APIC ? "irq_apic" : "irq_pic", n, 0, t1);
		else
			uprintf("minios: bench %s unavailable\n",
				which == BENCH_IRQ_APIC ? "irq_apic" : "irq_pic");
		break;
	case BENCH_COMPUTE: { /* sha256 over a 64 KiB buffer */
		const u32 size = 64 * 1024;
		u8 *buf = (u8 *)u_sbrk(size);
		for (i = 0; i < size; i++)
			buf[i] = (u8)(i * 7 + (i >> 8));
		u8 digest[32];
		n = 2;
		t0 = rdtsc();
		for (i = 0; i < n; i++) {
			struct sha256 s;
			sha256_init(&s);
			sha256_update(&s, buf, size);
			sha256_final(&s, digest);
			buf[0] = digest[0];
		}
		t1 = rdtsc();
		report("compute", n, t0, t1);
		break;
	}
	default:
		err = 1;
	}
	u_exit(err);
}
