//! The guest's descriptor tables and their shadow: the GDT the CPU really
//! uses, with every descriptor confined below the monitor and DPL-0
//! descriptors compressed to ring 1.

use super::*;

impl Trap {
    /// Reads the guest's descriptor for `sel` from its GDT (no LDT support).
    pub(crate) fn guest_descriptor(&self, sel: u16) -> Option<Descriptor> {
        if sel & 4 != 0 || sel & !7 == 0 {
            return None;
        }
        let off = (sel & !7) as u32;
        if off + 7 > self.v.gdtr.limit as u32 {
            return None;
        }
        let mut b = [0u8; 8];
        self.guest_read((self.v.gdtr.base as u32).wrapping_add(off), &mut b)
            .ok()?;
        Some(Descriptor {
            lo: u32::from_le_bytes(b[..4].try_into().unwrap()),
            hi: u32::from_le_bytes(b[4..].try_into().unwrap()),
        })
    }

    /// Rebuilds the shadow GDT from the guest's.
    pub(crate) fn sync_gdt(&mut self) {
        let base = self.pool(GDT_PAGE);
        shadow::zero(&self.hram, base, desc::GUEST_GDT_END as u64);
        self.dpl3.clear();
        let end = (self.v.gdtr.limit as u32 + 1).min(desc::GUEST_GDT_END);
        let mut raw = vec![0u8; end as usize];
        if self.guest_read(self.v.gdtr.base as u32, &mut raw).is_err() {
            return;
        }
        // Write-protect the guest's GDT pages: stores to them resync this.
        let mut pages = Vec::new();
        let first = self.v.gdtr.base as u32 & !0xfff;
        let last = (self.v.gdtr.base as u32).wrapping_add(end.saturating_sub(1)) & !0xfff;
        let mut lin = first;
        loop {
            if let Ok(w) = self.walk(lin, false, false) {
                let g = w.page >> 12;
                if !pages.iter().any(|&(p, _)| p == g) {
                    pages.push((g, self.host_page(w.page)));
                }
            }
            if lin == last {
                break;
            }
            lin = lin.wrapping_add(0x1000);
        }
        self.shadow.set_gdt_pages(&self.hram, &pages);
        self.cpu.flush_tlb();
        for i in 1..(end / 8) as usize {
            let d = Descriptor {
                lo: u32::from_le_bytes(raw[i * 8..i * 8 + 4].try_into().unwrap()),
                hi: u32::from_le_bytes(raw[i * 8 + 4..i * 8 + 8].try_into().unwrap()),
            };
            if d.is_code_data() && d.dpl() == 3 {
                self.dpl3.push(i as u16);
            }
            let s = desc::shadow_descriptor(d, self.user_view);
            let _ = self.hram.write_u32_untracked(base + i as u64 * 8, s.lo);
            let _ = self.hram.write_u32_untracked(base + i as u64 * 8 + 4, s.hi);
        }
    }

    /// Shows or hides the guest's DPL-3 segments in the shadow GDT.
    pub(crate) fn set_view(&mut self, user: bool) {
        if self.user_view == user {
            return;
        }
        self.user_view = user;
        let base = self.pool(GDT_PAGE);
        for &i in &self.dpl3 {
            let a = base + i as u64 * 8 + 4;
            if let Ok(hi) = self.hram.read_u32(a) {
                let hi = if user { hi | 1 << 15 } else { hi & !(1 << 15) };
                let _ = self.hram.write_u32_untracked(a, hi);
            }
        }
    }

    /// The hidden-cache value the CPU would load for guest selector `sel`
    /// from the shadow GDT, with the RPL the guest kernel gets at ring 1.
    pub(crate) fn shadow_segment(&self, sel: u16) -> Option<Segment> {
        let d = self.guest_descriptor(sel)?;
        let s = desc::shadow_descriptor(d, true);
        let rpl = if d.dpl() == 0 { 1 } else { sel & 3 };
        let mut sg = s.to_segment((sel & !3) | rpl);
        if d.present() {
            sg.attr |= popek_cpu::state::attr::P;
        }
        // A code segment `confine` could not cut has no safe form.
        desc::confined(&sg).then_some(sg)
    }
}
