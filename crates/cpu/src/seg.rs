//! Segmentation: descriptor parsing, segment-register loads with their
//! privilege checks, and segment-relative memory accesses with limit and
//! type checks.

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::exception::{Exc, Res, Vector};
use crate::hooks::SensitiveKind;
use crate::state::{attr, seg, Segment};

/// `seg_ok` bit: reads within the limit need no further checks.
pub(crate) const SEG_R: u8 = 1;
/// `seg_ok` bit: writes within the limit need no further checks.
pub(crate) const SEG_W: u8 = 2;

/// A raw 8-byte descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Low dword.
    pub lo: u32,
    /// High dword.
    pub hi: u32,
}

impl Descriptor {
    /// The hidden-cache form of this descriptor for `selector`.
    pub fn to_segment(self, selector: u16) -> Segment {
        let base = (self.lo >> 16) | ((self.hi & 0xff) << 16) | (self.hi & 0xff00_0000);
        let mut limit = (self.lo & 0xffff) | (self.hi & 0xf_0000);
        if self.hi & (1 << 23) != 0 {
            limit = (limit << 12) | 0xfff;
        }
        let attr = (((self.hi >> 8) & 0xff) | (((self.hi >> 20) & 0xf) << 12)) as u16;
        Segment {
            selector,
            attr,
            limit,
            base: base as u64,
        }
    }
    /// S bit: code or data (not system).
    pub fn is_code_data(self) -> bool {
        self.hi & (1 << 12) != 0
    }
    /// Code segment (with S set).
    pub fn is_code(self) -> bool {
        self.hi & (1 << 11) != 0
    }
    /// Type field.
    pub fn typ(self) -> u8 {
        ((self.hi >> 8) & 0xf) as u8
    }
    /// DPL.
    pub fn dpl(self) -> u8 {
        ((self.hi >> 13) & 3) as u8
    }
    /// Present.
    pub fn present(self) -> bool {
        self.hi & (1 << 15) != 0
    }
    /// Conforming code.
    pub fn conforming(self) -> bool {
        self.is_code() && self.hi & (1 << 10) != 0
    }
    /// Readable code or any data.
    pub fn readable(self) -> bool {
        !self.is_code() || self.hi & (1 << 9) != 0
    }
    /// Writable data.
    pub fn writable_data(self) -> bool {
        !self.is_code() && self.hi & (1 << 9) != 0
    }
}

/// Which table a selector points into and where its descriptor is.
pub(crate) fn selector_index(sel: u16) -> u32 {
    (sel & !7) as u32
}

impl Cpu {
    /// Re-derives the fast-path permission bits of a segment register.
    pub(crate) fn refresh_seg(&mut self, s: usize) {
        let sg = self.st.seg[s];
        self.seg_ok[s] = if !self.protected() || self.v86() {
            SEG_R | SEG_W
        } else if !sg.present() {
            0
        } else if sg.attr & attr::CODE != 0 {
            if sg.attr & attr::RW != 0 {
                SEG_R
            } else {
                0
            }
        } else if sg.attr & attr::DC != 0 {
            0 // expand-down: the slow path checks
        } else if sg.attr & attr::RW != 0 {
            SEG_R | SEG_W
        } else {
            SEG_R
        };
        if s == seg::CS || s == seg::SS {
            self.cpl = self.st.cpl();
        }
    }

    /// Linear address of `seg:off` for an access of `size` bytes, with every
    /// segmentation check (SDM 5.3, 5.5).
    #[inline(always)]
    pub(crate) fn seg_lin(&mut self, s: usize, off: u32, size: u8, write: bool) -> Res<u32> {
        let sg = &self.st.seg[s];
        let need = if write { SEG_W } else { SEG_R };
        if self.seg_ok[s] & need != 0 && off as u64 + size as u64 - 1 <= sg.limit as u64 {
            return Ok((sg.base as u32).wrapping_add(off));
        }
        self.seg_lin_slow(s, off, size, write)
    }

    #[cold]
    fn seg_lin_slow(&mut self, s: usize, off: u32, size: u8, write: bool) -> Res<u32> {
        let sg = self.st.seg[s];
        let fault = if s == seg::SS {
            Exc::fault_code(Vector::SS, 0)
        } else {
            Exc::gp(0)
        };
        let protected = self.protected() && !self.v86();
        if protected {
            if !sg.present() {
                return Err(fault);
            }
            let code = sg.attr & attr::CODE != 0;
            if write && (code || sg.attr & attr::RW == 0) {
                return Err(Exc::gp(0));
            }
            if !write && code && sg.attr & attr::RW == 0 {
                return Err(Exc::gp(0));
            }
        }
        let last = off as u64 + size as u64 - 1;
        let expand_down = protected && sg.attr & (attr::CODE | attr::DC) == attr::DC;
        if expand_down {
            let upper: u64 = if sg.big() { 0xffff_ffff } else { 0xffff };
            if (off as u64) <= sg.limit as u64 || last > upper {
                return Err(fault);
            }
        } else if last > sg.limit as u64 {
            return Err(fault);
        }
        Ok((sg.base as u32).wrapping_add(off))
    }

    /// Reads `size` bytes at `seg:off`.
    #[inline(always)]
    pub(crate) fn read_mem(&mut self, bus: &mut dyn Bus, s: usize, off: u32, size: u8) -> Res<u64> {
        let lin = self.seg_lin(s, off, size, false)?;
        self.read_lin(bus, lin, size)
    }

    /// Reads `size` bytes at `seg:off` for a read-modify-write: the segment
    /// and the page(s) are checked for writing first, so a fault reports a
    /// write (Intel processors do the same).
    #[inline]
    pub(crate) fn read_mem_rmw(
        &mut self,
        bus: &mut dyn Bus,
        s: usize,
        off: u32,
        size: u8,
    ) -> Res<u64> {
        let lin = self.seg_lin(s, off, size, true)?;
        self.read_lin_rmw(bus, lin, size)
    }

    /// Reads at a linear address for a read-modify-write: the page(s) are
    /// checked for writing first (see `read_mem_rmw`).
    #[inline]
    pub(crate) fn read_lin_rmw(&mut self, bus: &mut dyn Bus, lin: u32, size: u8) -> Res<u64> {
        if self.st.cr0 & crate::state::cr::CR0_PG != 0 {
            let user = self.cpl == 3;
            self.translate(bus, lin, crate::mmu::AccessKind::Write, user)?;
            let end = lin.wrapping_add(size as u32 - 1);
            if (lin ^ end) & !0xfff != 0 {
                self.translate(bus, end & !0xfff, crate::mmu::AccessKind::Write, user)?;
            }
        }
        self.read_lin(bus, lin, size)
    }

    /// Writes `size` bytes at `seg:off`.
    #[inline(always)]
    pub(crate) fn write_mem(
        &mut self,
        bus: &mut dyn Bus,
        s: usize,
        off: u32,
        size: u8,
        val: u64,
    ) -> Res {
        let lin = self.seg_lin(s, off, size, true)?;
        self.write_lin(bus, lin, size, val)
    }

    /// Reads the descriptor a selector names from the GDT or LDT.
    /// `err` is the exception raised when the selector is outside the table.
    pub(crate) fn read_descriptor(
        &mut self,
        bus: &mut dyn Bus,
        sel: u16,
        err: Vector,
    ) -> Res<Descriptor> {
        let (base, limit) = if sel & 4 != 0 {
            if !self.st.ldtr.present() {
                return Err(Exc::fault_code(err, (sel & 0xfffc) as u32));
            }
            (self.st.ldtr.base, self.st.ldtr.limit)
        } else {
            (self.st.gdtr.base, self.st.gdtr.limit as u32)
        };
        let idx = selector_index(sel);
        if idx + 7 > limit {
            return Err(Exc::fault_code(err, (sel & 0xfffc) as u32));
        }
        let lin = (base as u32).wrapping_add(idx);
        let lo = self.read_lin_sys(bus, lin, 4)? as u32;
        let hi = self.read_lin_sys(bus, lin.wrapping_add(4), 4)? as u32;
        Ok(Descriptor { lo, hi })
    }

    /// Sets the accessed bit of a code/data descriptor in memory.
    pub(crate) fn set_accessed(&mut self, bus: &mut dyn Bus, sel: u16, d: Descriptor) -> Res {
        if d.hi & (1 << 8) == 0 {
            let base = if sel & 4 != 0 {
                self.st.ldtr.base
            } else {
                self.st.gdtr.base
            };
            let lin = (base as u32).wrapping_add(selector_index(sel) + 4);
            self.write_lin_sys(bus, lin, 4, (d.hi | (1 << 8)) as u64)?;
        }
        Ok(())
    }

    /// Loads a data segment register or SS (MOV, POP, LDS…) with the
    /// protected-mode checks of the SDM's MOV pseudo-code.
    pub(crate) fn load_seg(&mut self, bus: &mut dyn Bus, s: usize, sel: u16) -> Res {
        if !self.protected() || self.v86() {
            let v86 = self.v86();
            let sg = &mut self.st.seg[s];
            sg.selector = sel;
            sg.base = (sel as u64) << 4;
            if v86 {
                sg.limit = 0xffff;
                sg.attr = attr::P | attr::S | attr::RW | attr::ACCESSED | (3 << 5);
            }
        } else {
            let cpl = self.cpl;
            let rpl = (sel & 3) as u8;
            if sel & !3 == 0 {
                if s == seg::SS {
                    return Err(Exc::gp(0));
                }
                // A null selector: usable for nothing until reloaded.
                self.st.seg[s] = Segment {
                    selector: sel,
                    attr: 0,
                    limit: 0,
                    base: 0,
                };
            } else {
                let d = self.read_descriptor(bus, sel, Vector::GP)?;
                let e = (sel & 0xfffc) as u32;
                if s == seg::SS {
                    if rpl != cpl || !d.is_code_data() || !d.writable_data() || d.dpl() != cpl {
                        return Err(Exc::gp(e));
                    }
                    if !d.present() {
                        return Err(Exc::fault_code(Vector::SS, e));
                    }
                } else {
                    if !d.is_code_data() || !d.readable() {
                        return Err(Exc::gp(e));
                    }
                    if !d.conforming() && (rpl > d.dpl() || cpl > d.dpl()) {
                        return Err(Exc::gp(e));
                    }
                    if !d.present() {
                        return Err(Exc::fault_code(Vector::NP, e));
                    }
                }
                self.set_accessed(bus, sel, d)?;
                self.st.seg[s] = d.to_segment(sel);
                self.st.seg[s].attr |= attr::ACCESSED;
            }
        }
        self.refresh_seg(s);
        if s == seg::SS {
            self.st.interrupt_shadow = true;
            self.stop_block = true;
        }
        if self.report_sensitive {
            self.note_sensitive(bus, SensitiveKind::LoadSegment, sel as u64, sel as u64);
        }
        Ok(())
    }

    /// Checks a segment value (not necessarily loaded) for an access, giving
    /// its linear address; used for stacks being switched to (and by
    /// monitors that build exception frames themselves).
    pub fn seg_value_lin(sg: &Segment, off: u32, size: u8) -> Option<u32> {
        let last = off as u64 + size as u64 - 1;
        if sg.attr & (attr::CODE | attr::DC) == attr::DC {
            let upper: u64 = if sg.big() { 0xffff_ffff } else { 0xffff };
            if (off as u64) <= sg.limit as u64 || last > upper {
                return None;
            }
        } else if last > sg.limit as u64 {
            return None;
        }
        Some((sg.base as u32).wrapping_add(off))
    }
}
