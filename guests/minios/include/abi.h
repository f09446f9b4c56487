/*
 * The minios system-call ABI: a number and up to three arguments, the result
 * (negative on error). The instruction and registers are the architecture's
 * (arch/ARCH/usys_arch.h): i386 int 0x80 with EAX = number, arguments in EBX,
 * ECX, EDX; x86-64 SYSCALL with RAX = number, arguments in RDI, RSI, RDX.
 * Shared by the kernel and the user programs.
 */
#ifndef MINIOS_ABI_H
#define MINIOS_ABI_H

#define SYS_EXIT 0      /* exit(code): never returns */
#define SYS_WRITE 1     /* write(buf, len) -> len, to the console */
#define SYS_GETPID 2    /* getpid() -> pid */
#define SYS_YIELD 3     /* yield() -> 0 */
#define SYS_SBRK 4      /* sbrk(bytes) -> old break; pages are mapped on first touch */
#define SYS_SPAWN 5     /* spawn(prog, arg) -> child pid, new address space */
#define SYS_WAIT 6      /* wait(&status) -> pid of a reaped child, -1 if none */
#define SYS_TICKS 7     /* ticks() -> timer ticks since the timer started */
#define SYS_PTEMOD 8    /* ptemod(va) -> new PTE flags: toggles R/W of va's PTE and INVLPGs */
#define SYS_SETDE 9     /* setde(eip): on #DE in this process, resume at eip */
#define SYS_INB 10      /* inb(port) -> value (only the benchmark port) */
#define SYS_REPORT 11   /* report(slot, value): user self-check results to the kernel */
#define SYS_STAT 12     /* stat(which) -> kernel counter, see STAT_* */
#define SYS_IRQBENCH 13 /* irqbench(path, n) -> mean TSC cycles per interrupt (0: path unavailable) */
#define NSYSCALLS 13

#define STAT_PREEMPTIONS 0 /* timer-driven switches away from a ring-3 process */
#define STAT_SWITCHES 1    /* all context switches */
#define STAT_TSC_KHZ 2     /* the TSC rate measured at boot, kHz (0: unknown) */

/* Programs that spawn() can start (all linked into the image). */
#define PROG_INIT 0
#define PROG_CHECK 1
#define PROG_SPIN 2
#define PROG_BENCH 3
#define PROG_NULL 4
#define NPROGS 5

/* Benchmarks, the arg of PROG_BENCH. */
#define BENCH_SYSCALL 0
#define BENCH_IN 1
#define BENCH_CALLRET 2
#define BENCH_PAGEFAULT 3
#define BENCH_PTEMOD 4
#define BENCH_DIVZERO 5
#define BENCH_FORKWAIT 6
#define BENCH_COMPUTE 7
#define BENCH_IRQ_PIC 8    /* an interrupt through the 8259, raised by the i8042 */
#define BENCH_IRQ_APIC 9   /* a self-IPI through the local APIC */
#define NBENCH 10

/* Slots of SYS_REPORT (filled by PROG_CHECK). */
#define REP_CPL 0       /* CS & 3 seen at ring 3 */
#define REP_GETPID 1    /* getpid() result */
#define REP_DEMAND 2    /* value read back from a demand-paged heap page */
#define REP_DE 3        /* number of #DE delivered back to the program */
#define REP_SBRK 4      /* sbrk(0) after growing by one page minus the old break */
#define NREP 5

/* The port the "in" benchmark reads: COM1's line status register. */
#define BENCH_PORT 0x3fd

/* User address space. */
#define USER_HEAP 0x40000000u
#define USER_HEAP_MAX 0x10000000u
#define USER_STACK_TOP 0x80000000u
#define USER_STACK_MAX 0x10000u

#endif
