/*
 * 2-level 4 KiB paging. The first KMAP_LIMIT bytes of RAM are identity-mapped
 * (supervisor-only, except the .user image pages: user read-only); their page
 * tables are shared by every page directory. Virtual 1 GiB and up is the
 * per-process user half.
 */
#include "kernel.h"

uptr kernel_pd;
uptr ram_top;
static uptr kmap_top;   /* end of the identity map */

#define PDX(va) ((va) >> 22)
#define PTX(va) (((va) >> 12) & 0x3ff)
#define USER_PDE_FIRST PDX(USER_HEAP)

pte_t *pte_lookup(uptr pd, uptr va, int create)
{
	pte_t *pde = (pte_t *)pd + PDX(va);
	if (!(*pde & PTE_P)) {
		if (!create)
			return NULL;
		uptr pt = page_alloc();
		if (!pt)
			return NULL;
		*pde = pt | PTE_P | PTE_W | PTE_U;
	}
	return (pte_t *)(*pde & PAGE_MASK) + PTX(va);
}

void mmu_init(uptr top)
{
	ram_top = top;
	kmap_top = top < KMAP_LIMIT ? top : KMAP_LIMIT;
	kmap_top &= PAGE_MASK;
	for (uptr pa = (uptr)__kernel_end; pa + PAGE_SIZE <= kmap_top; pa += PAGE_SIZE)
		page_free(pa);
	/* Paging is still off: page tables are addressed physically. */
	kernel_pd = page_alloc();
	pte_t *pd = (pte_t *)kernel_pd;
	for (uptr va = PAGE_SIZE; va < kmap_top; va += PAGE_SIZE) { /* page 0 stays unmapped */
		u32 flags = PTE_W;
		if (va >= (uptr)__user_start && va < (uptr)__user_end)
			flags = PTE_U; /* ring 3: read and execute; the kernel writes nothing there */
		pte_t *pte = pte_lookup(kernel_pd, va, 1);
		*pte = va | flags | PTE_P;
	}
#ifndef PARAVIRT
	/* The local APIC's registers (0xFEE00000) for the interrupt benchmark. */
	*pte_lookup(kernel_pd, LAPIC_VA, 1) = 0xfee00000u | PTE_W | PTE_P;
#endif
	/* The shared kernel PDEs must not change later: pd_create copies them. */
	for (u32 i = 0; i < USER_PDE_FIRST; i++)
		if (pd[i] & PTE_P)
			pd[i] |= PTE_U;
	active_pd = kernel_pd;
	enable_paging(kernel_pd);
}

uptr pd_create(void)
{
	uptr pd = page_alloc();
	if (!pd)
		return 0;
	memcpy((void *)pd, (void *)kernel_pd, USER_PDE_FIRST * 4);
	return pd;
}

void pd_destroy(uptr pd)
{
	pte_t *dir = (pte_t *)pd;
	for (u32 i = USER_PDE_FIRST; i < 1024; i++) {
		if (!(dir[i] & PTE_P))
			continue;
		pte_t *pt = (pte_t *)(dir[i] & PAGE_MASK);
		for (u32 j = 0; j < 1024; j++)
			if (pt[j] & PTE_P)
				page_free(pt[j] & PAGE_MASK);
		page_free((uptr)pt);
	}
	page_free(pd);
}
