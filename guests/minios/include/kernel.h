/* Kernel-internal declarations. */
#ifndef MINIOS_KERNEL_H
#define MINIOS_KERNEL_H

#include "types.h"
#include "lib.h"
#include "abi.h"
#include "arch.h"

/* The trap-frame vector of a system call: INT 0x80 on i386; on x86-64 the
 * SYSCALL entry (trap.S) builds its frame with this vector. */
#define T_SYSCALL 0x80

static inline int tf_from_user(const struct trapframe *tf) { return (tf->cs & 3) == 3; }

/* console.c */
void console_init(void);
void console_listen(void);
void console_irq(void);

/* The interrupt-delivery benchmark (kernel/irqbench.c). */
#define IRQ_BENCH_VECTOR 0xf0
#define LAPIC_VA 0x3ff00000u /* the local APIC's page, in the shared kernel gigabyte */
u32 irq_bench(u32 apic, u32 n);
void irq_bench_pic(void);
void irq_bench_apic(void);
void console_write(const char *s, size_t n);
int kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* main.c */
void kmain(u32 magic, uptr mbi_addr);
extern const char *const flavour;
void __attribute__((noreturn)) machine_exit_failure(u32 code);
void __attribute__((noreturn)) machine_power_off(void);
void __attribute__((noreturn)) panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* acpi.c */
struct acpi_info {
	u16 pm1a_cnt, pm1b_cnt;
	u16 slp_typa, slp_typb;
	int found; /* 1: FADT and _S5_ found */
};
extern struct acpi_info acpi;
void acpi_init(void);
void acpi_power_off(void);

/* pic_pit.c */
void pic_init(void);
void pic_eoi(u32 irq);
void pit_init(u32 hz);
#define TIMER_HZ 100
extern u32 tsc_khz; /* measured at boot; 0 if calibration failed */
void tsc_calibrate(void);

/* desc.c (arch) */
extern u64 gdt[GDT_ENTRIES];
extern u64 idt[IDT_QWORDS];
struct tss;
extern struct tss tss;
void desc_init(void);
void tss_set_kernel_stack(uptr sp0);
#define GDT_LIMIT (sizeof(gdt) - 1)
#define IDT_LIMIT (sizeof(idt) - 1)

/* mmu.c (arch) */
#define KMAP_LIMIT (64u << 20) /* RAM identity-mapped for the kernel */
/* A "page directory" is the root of a page-table tree (CR3), by physical
 * address; RAM below KMAP_LIMIT is identity-mapped, so physical == virtual. */
extern uptr kernel_pd;
extern uptr active_pd;
void switch_pd(uptr pd);
extern uptr ram_top;
void mmu_init(uptr ram_top);
uptr page_alloc(void);          /* a zeroed physical page, 0 if none */
void page_free(uptr pa);
u32 pages_free(void);
uptr pd_create(void);           /* a page directory sharing the kernel mappings */
void pd_destroy(uptr pd);       /* free the user half and the directory */
pte_t *pte_lookup(uptr pd, uptr va, int create);
int map_page(uptr pd, uptr va, uptr pa, u32 flags);
void flush_page(uptr pd, uptr va);

/* proc.c */
enum pstate { P_UNUSED, P_RUNNABLE, P_RUNNING, P_WAITING, P_ZOMBIE };
struct proc {
	uptr ctx;               /* saved kernel stack pointer (see swtch) */
	u32 pid;
	enum pstate state;
	uptr pd;
	uptr brk;
	uptr de_resume;
	struct proc *parent;
	s32 exit_code;
	u8 kstack[8192] __attribute__((aligned(16)));
};
#define NPROC 16
extern struct proc *current;
extern struct proc procs[NPROC];
extern u32 jiffies;
extern u32 stat_preemptions, stat_switches;
extern s32 check_reports[NREP];
void proc_init(void);
s32 proc_spawn(u32 prog, u32 arg, struct proc *parent);
void schedule(void);
void __attribute__((noreturn)) proc_exit(s32 code);
void syscall(struct trapframe *tf);
s32 reap_child(struct proc *parent, s32 *status);
int demand_fault(uptr va);
void timer_start(void);

/* trap.c */
void trap(struct trapframe *tf);
extern u32 stat_syscall_faults; /* x86-64: SYSCALLs completed from #PF (arch.h) */
extern volatile uptr probe_pf_active, probe_pf_cr2, probe_pf_err, probe_pf_count;
extern volatile uptr probe_de_count, probe_de_eip, probe_de_vector;

/* arch asm */
void swtch(uptr *old_sp, uptr new_sp);
extern char trapret[];
extern char trap_vectors[];
u32 de_probe(void);
extern char de_probe_insn[];
extern char de_probe_resume[];

/* checks.c */
int run_checks(void);
extern u32 nfailures;
void check(const char *name, uptr got, uptr want);

/* linker symbols */
extern char __user_start[], __user_end[], __kernel_end[];

#endif
