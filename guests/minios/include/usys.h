/* Ring-3 side of the system-call ABI (include/abi.h). */
#ifndef MINIOS_USYS_H
#define MINIOS_USYS_H

#include "types.h"
#include "abi.h"
#include "lib.h"

/* sys3(n, a, b, c): the system-call instruction of the architecture
 * (arch/ARCH/usys_arch.h: i386 int 0x80, x86-64 SYSCALL). Programs use the
 * u_* stubs below, the same on both. */
#include "usys_arch.h"
static inline void __attribute__((noreturn)) u_exit(s32 code)
{
	sys3(SYS_EXIT, (uptr)(sptr)code, 0, 0);
	__builtin_unreachable();
}
static inline s32 u_write(const void *buf, u32 n) { return (s32)sys3(SYS_WRITE, (uptr)buf, n, 0); }
static inline s32 u_getpid(void) { return (s32)sys3(SYS_GETPID, 0, 0, 0); }
static inline s32 u_yield(void) { return (s32)sys3(SYS_YIELD, 0, 0, 0); }
static inline uptr u_sbrk(u32 n) { return (uptr)sys3(SYS_SBRK, n, 0, 0); }
static inline s32 u_spawn(u32 prog, u32 arg) { return (s32)sys3(SYS_SPAWN, prog, arg, 0); }
static inline s32 u_wait(s32 *status) { return (s32)sys3(SYS_WAIT, (uptr)status, 0, 0); }
static inline u32 u_ticks(void) { return (u32)sys3(SYS_TICKS, 0, 0, 0); }
static inline s32 u_ptemod(uptr va) { return (s32)sys3(SYS_PTEMOD, va, 0, 0); }
static inline s32 u_setde(void *eip) { return (s32)sys3(SYS_SETDE, (uptr)eip, 0, 0); }
static inline s32 u_inb(u32 port) { return (s32)sys3(SYS_INB, port, 0, 0); }
static inline s32 u_report(u32 slot, u32 v) { return (s32)sys3(SYS_REPORT, slot, v, 0); }
static inline s32 u_stat(u32 which) { return (s32)sys3(SYS_STAT, which, 0, 0); }
static inline u32 u_irqbench(u32 path, u32 n) { return (u32)sys3(SYS_IRQBENCH, path, n, 0); }

int uprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* user/uasm.S */
u32 u_divzero_loop(u32 n); /* n divides by zero, each resumed at u_divzero_resume; -> #DE count */
extern char u_divzero_resume[];

#endif
