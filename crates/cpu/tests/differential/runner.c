/*
 * Native runner for the differential test (crates/cpu/tests/differential.rs).
 *
 * A freestanding static i386 program (no libc: raw `int $0x80` system
 * calls), built at test time with
 *   gcc -m32 -ffreestanding -nostdlib -static -fno-pie -no-pie -O2
 * and run under the kernel's IA32 compatibility mode. It maps four pages at
 * fixed addresses, the same ones the software CPU uses:
 *   0x10000000 code (RWX, two pages: a case may start near the end of the
 *              first so that its instructions cross into the second)
 *   0x10100000 scratch data   0x10200000 stack
 *   0x10300000 control page (register staging, return path; never touched
 *              by generated code)
 * For each case of the batch file named by argv[1] it copies the code to
 * the code page followed by an epilogue, fills the scratch and stack pages
 * from a seed, loads the eight GPRs and EFLAGS, jumps to the code and, when
 * the epilogue jumps back, writes the registers, EFLAGS and the changed
 * dwords of both pages to stdout.
 *
 * Input (little-endian u32s): ncases, then per case
 *   code_len, eax ecx edx ebx esp ebp esi edi, eflags, seed, kind,
 *   code_off (offset of the code in the code pages),
 *   code bytes padded to a multiple of 4.
 * Output: first a header record: magic 0x706f7065, cs ds es ss fs gs;
 * then per case: index, eax ecx edx ebx esp ebp esi edi, eflags,
 *   signal (0 if the code reached its end), trapno, error code, eip, cr2,
 *   nscratch, (offset, value) * nscratch, nstack, (offset, value) * nstack.
 * A case that faults is caught by a signal handler (on its own stack) that
 * records the registers, EFLAGS, the vector (trapno), error code, EIP and
 * CR2 the kernel reports, and resumes the runner; anything else that kills
 * the process makes the test restart it after that case.
 */
typedef unsigned int u32;
typedef unsigned char u8;

#define CODE 0x10000000u
#define SCRATCH 0x10100000u
#define STACK 0x10200000u
#define CTL 0x10300000u
#define PAGE 4096u

/* Control page layout. */
#define CTL_STAGE 0x00   /* edi esi ebp (esp) ebx edx ecx eax eflags: popal; popfl */
#define CTL_INIT_ESP 0x40
#define CTL_ENTRY 0x44
#define CTL_RET 0x48
#define CTL_OUT_ESP 0x4c
#define CTL_SAVED_ESP 0x50
#define CTL_OUT 0x1dc    /* pushal image then eflags (epilogue stack top 0x200) */
#define CTL_FAULT 0x60   /* signal, trapno, err, eip, cr2 */

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *dd = d;
	const u8 *ss = s;
	while (n--)
		*dd++ = *ss++;
	return d;
}

void *memset(void *d, int c, unsigned long n)
{
	u8 *dd = d;
	while (n--)
		*dd++ = (u8)c;
	return d;
}

static int sys1(int n, int a)
{
	int r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a) : "memory");
	return r;
}

static int sys3(int n, int a, int b, int c)
{
	int r;
	__asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
	return r;
}

static void die(int code)
{
	for (;;)
		sys1(1, code);
}

static void map_fixed(u32 addr, u32 len, u32 prot)
{
	/* old_mmap (90) takes a pointer to its six arguments. */
	u32 args[6] = { addr, len, prot, 0x32 /* MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED */, (u32)-1, 0 };
	u32 r = (u32)sys1(90, (int)args);
	if (r != addr)
		die(3);
}

static u8 inbuf[16u << 20];
static u32 outbuf[8192];
static u32 init_scratch[PAGE / 4];
static u32 init_stack[PAGE / 4];

static void write_all(const void *p, u32 n)
{
	const u8 *b = p;
	while (n) {
		int w = sys3(4, 1, (int)b, (int)n);
		if (w <= 0)
			die(4);
		b += w;
		n -= (u32)w;
	}
}

/* The page fill both sides compute: xorshift32 from the seed. */
static void fill(u32 *dst, u32 seed, u32 kind)
{
	u32 x = seed ? seed : 1;
	for (u32 i = 0; i < PAGE / 4; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		u32 w = x;
		if (kind == 1)
			w &= 0x03030303;
		else if (kind == 2)
			w = (i & 15) == 0 ? x : 0;
		dst[i] = w;
	}
}

extern void run_case(void);
extern void run_return(void);
extern void fault_return(void);

__asm__(
	".text\n"
	".globl run_case\n"
	"run_case:\n"
	"  pushal\n"
	"  pushfl\n"
	"  movl %esp, 0x10300050\n"
	"  movl $0x10300000, %esp\n"
	"  popal\n"
	"  popfl\n"
	"  movl 0x10300040, %esp\n"
	"  jmp *0x10300044\n"
	".globl fault_return\n"
	"fault_return:\n"
	"  movl $0x10300200, %esp\n"
	"  jmp run_return\n"
	".globl run_return\n"
	"run_return:\n"
	"  movl 0x10300050, %esp\n"
	"  popfl\n"
	"  popal\n"
	"  ret\n"
	".globl _start\n"
	"_start:\n"
	"  movl %esp, %eax\n"
	"  andl $-16, %esp\n"
	"  subl $12, %esp\n"
	"  pushl %eax\n"
	"  call cmain\n"
	"  hlt\n");

static const u8 epilogue[] = {
	0x89, 0x25, 0x4c, 0x00, 0x30, 0x10, /* mov [CTL+0x4c], esp */
	0xbc, 0x00, 0x02, 0x30, 0x10,       /* mov esp, CTL+0x200 */
	0x9c,                               /* pushfd */
	0x60,                               /* pushad */
	0xff, 0x25, 0x48, 0x00, 0x30, 0x10, /* jmp [CTL+0x48] */
};

/* Signal handler: save the state at the fault, resume at fault_return. */
static void on_fault(int sig, void *info, void *ucv)
{
	(void)info;
	u32 *g = (u32 *)((u8 *)ucv + 20); /* uc_mcontext.gregs */
	volatile u32 *ctl = (volatile u32 *)CTL;
	volatile u32 *o = (volatile u32 *)(CTL + CTL_OUT);
	/* gregs: gs fs es ds edi esi ebp esp ebx edx ecx eax trapno err eip
	   cs efl uesp ss fpstate oldmask cr2 */
	o[0] = g[4];
	o[1] = g[5];
	o[2] = g[6];
	o[4] = g[8];
	o[5] = g[9];
	o[6] = g[10];
	o[7] = g[11];
	o[8] = g[16];
	ctl[CTL_OUT_ESP / 4] = g[7];
	ctl[CTL_FAULT / 4 + 0] = (u32)sig;
	ctl[CTL_FAULT / 4 + 1] = g[12];
	ctl[CTL_FAULT / 4 + 2] = g[13];
	ctl[CTL_FAULT / 4 + 3] = g[14];
	ctl[CTL_FAULT / 4 + 4] = g[21];
	g[14] = (u32)fault_return;
	g[16] = 0x202;
}

static u8 altstack[65536];

static void install_handlers(void)
{
	u32 ss[3] = { (u32)altstack, 0, sizeof(altstack) };
	if (sys3(186, (int)ss, 0, 0) != 0) /* sigaltstack */
		die(9);
	/* k_sigaction: handler, flags, restorer, mask (64 bits). SA_SIGINFO |
	   SA_ONSTACK | SA_NODEFER; the vDSO provides the return trampoline. */
	u32 act[5] = { (u32)on_fault, 0x4 | 0x08000000 | 0x40000000, 0, 0, 0 };
	static const int sigs[] = { 4, 5, 7, 8, 11 };
	for (u32 i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
		int r;
		__asm__ volatile("int $0x80"
				 : "=a"(r)
				 : "a"(174), "b"(sigs[i]), "c"(act), "d"(0), "S"(8)
				 : "memory");
		if (r != 0)
			die(10);
	}
}

static u32 diff_page(u32 *out, const u32 *page, const u32 *init)
{
	u32 n = 0;
	for (u32 i = 0; i < PAGE / 4; i++) {
		if (page[i] != init[i]) {
			out[1 + 2 * n] = i * 4;
			out[2 + 2 * n] = page[i];
			n++;
		}
	}
	out[0] = n;
	return 1 + 2 * n;
}

void cmain(u32 *sp)
{
	u32 argc = sp[0];
	char **argv = (char **)(sp + 1);
	if (argc < 2)
		die(2);
	sys1(27, 120); /* alarm(120): never hang */
	int fd = sys3(5, (int)argv[1], 0, 0);
	if (fd < 0)
		die(5);
	u32 len = 0;
	for (;;) {
		int r = sys3(3, fd, (int)(inbuf + len), (int)(sizeof(inbuf) - len));
		if (r < 0)
			die(6);
		if (r == 0)
			break;
		len += (u32)r;
		if (len == sizeof(inbuf))
			die(7);
	}
	map_fixed(CODE, 2 * PAGE, 7);
	map_fixed(SCRATCH, PAGE, 3);
	map_fixed(STACK, PAGE, 3);
	map_fixed(CTL, PAGE, 3);
	volatile u32 *ctl = (volatile u32 *)CTL;
	ctl[CTL_RET / 4] = (u32)run_return;
	install_handlers();

	u32 hdr[7];
	unsigned short s;
	hdr[0] = 0x706f7065;
	__asm__ volatile("mov %%cs, %0" : "=r"(s)); hdr[1] = s;
	__asm__ volatile("mov %%ds, %0" : "=r"(s)); hdr[2] = s;
	__asm__ volatile("mov %%es, %0" : "=r"(s)); hdr[3] = s;
	__asm__ volatile("mov %%ss, %0" : "=r"(s)); hdr[4] = s;
	__asm__ volatile("mov %%fs, %0" : "=r"(s)); hdr[5] = s;
	__asm__ volatile("mov %%gs, %0" : "=r"(s)); hdr[6] = s;
	write_all(hdr, sizeof(hdr));

	const u32 *in = (const u32 *)inbuf;
	u32 ncases = *in++;
	for (u32 c = 0; c < ncases; c++) {
		u32 code_len = in[0];
		const u32 *regs = in + 1; /* eax ecx edx ebx esp ebp esi edi */
		u32 eflags = in[9], seed = in[10], kind = in[11], off = in[12];
		const u8 *code = (const u8 *)(in + 13);
		in += 13 + (code_len + 3) / 4;
		if (off + code_len + sizeof(epilogue) > 2 * PAGE)
			die(8);
		memcpy((void *)(CODE + off), code, code_len);
		memcpy((void *)(CODE + off + code_len), epilogue, sizeof(epilogue));
		ctl[CTL_ENTRY / 4] = CODE + off;
		fill(init_scratch, seed, kind);
		fill(init_stack, seed ^ 0x9e3779b9u, kind);
		memcpy((void *)SCRATCH, init_scratch, PAGE);
		memcpy((void *)STACK, init_stack, PAGE);
		/* popal order: edi esi ebp esp ebx edx ecx eax */
		ctl[0] = regs[7];
		ctl[1] = regs[6];
		ctl[2] = regs[5];
		ctl[3] = 0;
		ctl[4] = regs[3];
		ctl[5] = regs[2];
		ctl[6] = regs[1];
		ctl[7] = regs[0];
		ctl[8] = eflags;
		ctl[CTL_INIT_ESP / 4] = regs[4];
		for (u32 k = 0; k < 5; k++)
			ctl[CTL_FAULT / 4 + k] = 0;
		run_case();
		volatile u32 *o = (volatile u32 *)(CTL + CTL_OUT);
		u32 n = 0;
		outbuf[n++] = c;
		outbuf[n++] = o[7]; /* eax */
		outbuf[n++] = o[6]; /* ecx */
		outbuf[n++] = o[5]; /* edx */
		outbuf[n++] = o[4]; /* ebx */
		outbuf[n++] = ctl[CTL_OUT_ESP / 4];
		outbuf[n++] = o[2]; /* ebp */
		outbuf[n++] = o[1]; /* esi */
		outbuf[n++] = o[0]; /* edi */
		outbuf[n++] = o[8]; /* eflags */
		for (u32 k = 0; k < 5; k++)
			outbuf[n++] = ctl[CTL_FAULT / 4 + k];
		n += diff_page(outbuf + n, (const u32 *)SCRATCH, init_scratch);
		n += diff_page(outbuf + n, (const u32 *)STACK, init_stack);
		write_all(outbuf, n * 4);
	}
	die(0);
}
