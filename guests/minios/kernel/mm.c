/*
 * The architecture-independent half of the MMU code: the physical page
 * allocator, and mapping a page in an address space with the TLB (or, under
 * PARAVIRT, the VMM) told. The page-table format is arch/<arch>/mmu.c's
 * (pte_lookup).
 */
#include "kernel.h"

uptr active_pd; /* the page directory in CR3 (kept here: reading CR3 is privileged) */
static uptr free_list;  /* physical pages, linked through their first word */
static u32 nfree;

uptr page_alloc(void)
{
	uptr pa = free_list;
	if (!pa)
		return 0;
	free_list = *(uptr *)pa;
	nfree--;
	memset((void *)pa, 0, PAGE_SIZE);
	return pa;
}

void page_free(uptr pa)
{
	*(uptr *)pa = free_list;
	free_list = pa;
	nfree++;
}

u32 pages_free(void) { return nfree; }

/* Tell the TLB (or, paravirtualized, the VMM) that va's PTE changed. Done
 * after every PTE change of the active directory, including not-present ->
 * present, so a shadow-paging VMM of the PV kernel need not write-protect
 * page tables; changes to an inactive directory take effect at its next CR3
 * load. */
void flush_page(uptr pd, uptr va)
{
	if (pd == active_pd)
		invlpg(va);
}

void switch_pd(uptr pd)
{
	if (pd != active_pd) {
		active_pd = pd;
		write_cr3(pd);
	}
}

int map_page(uptr pd, uptr va, uptr pa, u32 flags)
{
	pte_t *pte = pte_lookup(pd, va, 1);
	if (!pte)
		return -1;
	*pte = pa | flags | PTE_P;
	flush_page(pd, va);
	return 0;
}
