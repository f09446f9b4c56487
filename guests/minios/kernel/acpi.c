/*
 * ACPI power-off, the hobby-OS way: RSDP -> RSDT -> FADT ("FACP") for the
 * PM1a/PM1b control ports, and the SLP_TYP values of the DSDT's \_S5_ package
 * found by scanning the DSDT bytes. Runs before paging is on (the tables may
 * lie above the identity map).
 */
#include "kernel.h"

struct acpi_info acpi;

static int sum_ok(const u8 *p, u32 n)
{
	u8 s = 0;
	for (u32 i = 0; i < n; i++)
		s += p[i];
	return s == 0;
}

static const u8 *find_rsdp(uptr from, uptr to)
{
	for (uptr a = from; a + 20 <= to; a += 16)
		if (!memcmp((const void *)a, "RSD PTR ", 8) && sum_ok((const u8 *)a, 20))
			return (const u8 *)a;
	return NULL;
}

static u32 rd32(const u8 *p) { return p[0] | (p[1] << 8) | (p[2] << 16) | ((u32)p[3] << 24); }

/* Parse one AML integer of the _S5_ package: ZeroOp, OneOp, BytePrefix n, or a raw byte. */
static const u8 *aml_small_int(const u8 *p, u16 *out)
{
	if (*p == 0x0a) { /* BytePrefix */
		*out = p[1];
		return p + 2;
	}
	if (*p == 0x00 || *p == 0x01) { /* ZeroOp, OneOp */
		*out = *p;
		return p + 1;
	}
	*out = *p;
	return p + 1;
}

void acpi_init(void)
{
	const u8 *rsdp = NULL;
	uptr ebda = (uptr)(*(const volatile u16 *)0x40e) << 4;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		rsdp = find_rsdp(ebda, ebda + 1024);
	if (!rsdp)
		rsdp = find_rsdp(0xe0000, 0x100000);
	if (!rsdp)
		return;
	const u8 *rsdt = (const u8 *)(uptr)rd32(rsdp + 16);
	if (!rsdt || memcmp(rsdt, "RSDT", 4))
		return;
	u32 len = rd32(rsdt + 4);
	const u8 *fadt = NULL;
	for (u32 off = 36; off + 4 <= len; off += 4) {
		const u8 *t = (const u8 *)(uptr)rd32(rsdt + off);
		if (t && !memcmp(t, "FACP", 4)) {
			fadt = t;
			break;
		}
	}
	if (!fadt)
		return;
	acpi.pm1a_cnt = (u16)rd32(fadt + 64);
	acpi.pm1b_cnt = (u16)rd32(fadt + 68);
	const u8 *dsdt = (const u8 *)(uptr)rd32(fadt + 40);
	if (!dsdt || memcmp(dsdt, "DSDT", 4))
		return;
	u32 dlen = rd32(dsdt + 4);
	for (u32 i = 36; i + 8 < dlen; i++) {
		const u8 *p = dsdt + i;
		if (memcmp(p, "_S5_", 4))
			continue;
		/* NameOp "_S5_" or NameOp "\_S5_", then PackageOp. */
		if (!(p[-1] == 0x08 || (p[-2] == 0x08 && p[-1] == '\\')) || p[4] != 0x12)
			continue;
		p += 5;
		p += ((*p & 0xc0) >> 6) + 1; /* PkgLength */
		p++;                          /* NumElements */
		p = aml_small_int(p, &acpi.slp_typa);
		aml_small_int(p, &acpi.slp_typb);
		acpi.found = acpi.pm1a_cnt != 0;
		return;
	}
}

void acpi_power_off(void)
{
	if (!acpi.found)
		return;
	outw(acpi.pm1a_cnt, (u16)((acpi.slp_typa << 10) | (1 << 13)));
	if (acpi.pm1b_cnt)
		outw(acpi.pm1b_cnt, (u16)((acpi.slp_typb << 10) | (1 << 13)));
}
