/*
 * 4-level 4 KiB paging. As on i386: the first KMAP_LIMIT bytes of RAM are
 * identity-mapped (supervisor-only except the .user image), and every address
 * space shares those tables: PML4[0] -> a per-process PDPT whose entry 0 (the
 * low 1 GiB) is the kernel's; entries 1..511 (1 GiB and up) are the user half.
 */
#include "kernel.h"

uptr kernel_pd;
uptr ram_top;
static uptr kmap_top;

#define IDX(va, level) (((va) >> (12 + 9 * (level))) & 511)
#define TABLE(e) ((pte_t *)(uptr)((e) & PTE_ADDR))

pte_t *pte_lookup(uptr pd, uptr va, int create)
{
	pte_t *t = (pte_t *)pd;
	for (int level = 3; level > 0; level--) {
		pte_t *e = &t[IDX(va, level)];
		if (!(*e & PTE_P)) {
			if (!create)
				return NULL;
			uptr nt = page_alloc();
			if (!nt)
				return NULL;
			*e = nt | PTE_P | PTE_W | PTE_U;
		}
		t = TABLE(*e);
	}
	return &t[IDX(va, 0)];
}

void mmu_init(uptr top)
{
	ram_top = top;
	kmap_top = (top < KMAP_LIMIT ? top : KMAP_LIMIT) & PAGE_MASK;
	for (uptr pa = (uptr)__kernel_end; pa + PAGE_SIZE <= kmap_top; pa += PAGE_SIZE)
		page_free(pa);
	/* entry.S's tables identity-map 4 GiB: new tables are addressed physically. */
	kernel_pd = page_alloc();
	for (uptr va = PAGE_SIZE; va < kmap_top; va += PAGE_SIZE) {
		u32 flags = PTE_W;
		if (va >= (uptr)__user_start && va < (uptr)__user_end)
			flags = PTE_U;
		*pte_lookup(kernel_pd, va, 1) = va | flags | PTE_P;
	}
#ifndef PARAVIRT
	/* The local APIC's registers (0xFEE00000) for the interrupt benchmark. */
	*pte_lookup(kernel_pd, LAPIC_VA, 1) = 0xfee00000u | PTE_W | PTE_P;
#endif
	active_pd = kernel_pd;
	enable_paging(kernel_pd);
}

uptr pd_create(void)
{
	uptr pml4 = page_alloc(), pdpt = page_alloc();
	if (!pml4 || !pdpt) {
		if (pml4)
			page_free(pml4);
		if (pdpt)
			page_free(pdpt);
		return 0;
	}
	pte_t *kpdpt = TABLE(((pte_t *)kernel_pd)[0]);
	((pte_t *)pdpt)[0] = kpdpt[0]; /* the low 1 GiB: kernel, shared */
	((pte_t *)pml4)[0] = pdpt | PTE_P | PTE_W | PTE_U;
	return pml4;
}

static void free_table(pte_t *t, int level)
{
	for (int i = 0; i < 512; i++) {
		if (!(t[i] & PTE_P))
			continue;
		if (level)
			free_table(TABLE(t[i]), level - 1);
		else
			page_free((uptr)(t[i] & PTE_ADDR));
	}
	page_free((uptr)t);
}

void pd_destroy(uptr pd)
{
	pte_t *pml4 = (pte_t *)pd;
	pte_t *pdpt = TABLE(pml4[0]);
	for (int i = 1; i < 512; i++) /* the user half of the low 512 GiB */
		if (pdpt[i] & PTE_P)
			free_table(TABLE(pdpt[i]), 1);
	page_free((uptr)pdpt);
	for (int i = 1; i < 512; i++)
		if (pml4[i] & PTE_P)
			free_table(TABLE(pml4[i]), 2);
	page_free(pd);
}
