//! Classifying the sensitive-but-unprivileged instructions the guest
//! ran (the x86 gap) for the audit: what each did at real ring 1 and
//! what it would have done at virtual ring 0.

use super::*;

/// What the audit learned from one report: the instruction's name,
/// whether the result differed from the virtual ring's, and the
/// consequence in words.
type Finding = (&'static str, bool, String);

impl Trap {
    /// Records one sensitive-instruction report in the audit: what the
    /// instruction did at the real ring against what it would have done
    /// at the guest's virtual ring.
    pub(crate) fn audit_event(&mut self, e: &SensitiveEvent) {
        use SensitiveKind as K;
        let ring = e.cpl;
        let (name, differed, text): Finding = match e.kind {
            K::Pushf => self.audit_pushf(e),
            K::Popf | K::Iret => self.audit_flags_write(e),
            K::Sgdt | K::Sidt => self.audit_table_read(e),
            K::Sldt | K::Str => self.audit_selector_read(e),
            K::Smsw => self.audit_smsw(e),
            K::ReadSegment => self.audit_segment_read(e),
            K::Lar | K::Lsl | K::Verr | K::Verw => {
                self.audit_descriptor_probe(e, if e.cpl == 3 { 3 } else { 0 })
            }
            K::LoadSegment => (
                "MOV/POP to a segment register",
                false,
                format!("segment load at CPL{ring}: DPL-0 descriptors are shadowed with DPL 1, so it succeeds as at ring 0"),
            ),
            K::FarCall | K::FarJmp => self.audit_far_transfer(e),
            K::FarRet => (
                "far RET",
                false,
                format!("far RET to {:#x} at CPL{ring}", e.operand as u16),
            ),
            // Not gap instructions: RDTSC is governed by CR4.TSD (mirrored),
            // CPUID answers the same at every ring, INT n and SYSENTER
            // fault to the monitor (DPL-0 gates, SYSENTER_CS = 0).
            K::Rdtsc | K::Cpuid | K::SoftInt | K::Sysenter => return,
        };
        // The audit covers the deprivileged guest kernel (ring 1), and
        // user code only where ring compression shows through to it.
        if e.cpl == 3 && !differed {
            return;
        }
        self.audit.record(name, e.linear_ip, differed, || text);
    }

    /// PUSHF: the real IF and IOPL it showed against the virtual ones.
    fn audit_pushf(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        let vif = self.v.vif;
        let viopl = self.v.iopl;
        let rif = e.result as u32 & flags::IF != 0;
        let riopl = ((e.result >> 12) & 3) as u8;
        let d = rif != vif || riopl != viopl;
        (
            "PUSHF",
            d,
            if d {
                format!(
                    "PUSHF at CPL{ring} showed IF={} IOPL={} while the virtual IF was {} and IOPL {}",
                    rif as u8, riopl, vif as u8, viopl
                )
            } else {
                format!("PUSHF at CPL{ring} showed the virtual IF and IOPL")
            },
        )
    }

    /// POPF/IRET: whether an IF or IOPL change the guest meant was
    /// ignored at ring 1 (a lost IF is remembered for the watchdog).
    fn audit_flags_write(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        let vcpl = if e.cpl == 3 { 3 } else { 0 };
        let vif = self.v.vif;
        let viopl = self.v.iopl;
        let addr = e.linear_ip;
        use SensitiveKind as K;
        let popped = e.operand as u32;
        let pif = popped & flags::IF != 0;
        let piopl = ((popped >> 12) & 3) as u8;
        let name = if e.kind == K::Popf { "POPF" } else { "IRET" };
        let may_if = vcpl <= viopl;
        let if_lost = may_if && pif != vif && e.cpl != 3;
        let iopl_lost = vcpl == 0 && piopl != viopl && e.cpl != 3;
        let d = if_lost || iopl_lost;
        let text = if if_lost {
            let what = if pif { "set" } else { "clear" };
            format!(
                "{name} at CPL{ring} tried to {what} IF: ignored (virtual IF stays {})",
                vif as u8
            )
        } else if iopl_lost {
            format!("{name} at CPL{ring} tried to set IOPL {piopl}: ignored")
        } else {
            format!("{name} at CPL{ring}: same effect as at the guest's ring")
        };
        if if_lost && pif {
            self.audit.last_if_loss = Some(IfLoss {
                instruction: name,
                address: addr,
                cpl: ring,
                consequence: text.clone(),
            });
        }
        (name, d, text)
    }

    /// SGDT/SIDT: the monitor's table or the guest's.
    fn audit_table_read(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        use SensitiveKind as K;
        let (gdtr, idtr, _) = desc::real_tables();
        let (name, v, lim, real_lim) = if e.kind == K::Sgdt {
            ("SGDT", self.v.gdtr.base, self.v.gdtr.limit, gdtr.limit)
        } else {
            ("SIDT", self.v.idtr.base, self.v.idtr.limit, idtr.limit)
        };
        let d = e.result != v || lim != real_lim;
        (
            name,
            d,
            if d {
                format!(
                    "{name} at CPL{ring} returned the monitor's table {:#x}/{real_lim:#x}, not the guest's {v:#x}/{lim:#x}",
                    e.result
                )
            } else {
                format!("{name} at CPL{ring} returned the guest's table")
            },
        )
    }

    /// SLDT/STR: the selector the guest loaded or another.
    fn audit_selector_read(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        use SensitiveKind as K;
        let (name, v) = if e.kind == K::Sldt {
            ("SLDT", self.v.ldtr.selector as u64)
        } else {
            ("STR", self.v.tr.selector as u64)
        };
        let d = e.result != v;
        (
            name,
            d,
            if d {
                format!(
                    "{name} at CPL{ring} returned {:#x}, the guest loaded {v:#x}",
                    e.result
                )
            } else {
                format!("{name} at CPL{ring} returned the guest's selector")
            },
        )
    }

    /// SMSW: the virtual CR0's low bits or the real ones.
    fn audit_smsw(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        let v = self.v.cr0 & 0xffff;
        let d = e.result & 0xffff != v;
        (
            "SMSW",
            d,
            if d {
                format!(
                    "SMSW at CPL{ring} returned {:#x}, virtual CR0 has {v:#x}",
                    e.result
                )
            } else {
                format!("SMSW at CPL{ring} returned the virtual CR0's low bits")
            },
        )
    }

    /// Reading CS or SS: an RPL that reveals the real ring.
    fn audit_segment_read(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        let vcpl = if e.cpl == 3 { 3 } else { 0 };
        let (name, which) = match e.operand as usize {
            seg::CS => ("MOV/PUSH from CS", "CS"),
            seg::SS => ("MOV/PUSH from SS", "SS"),
            _ => ("MOV/PUSH from DS/ES/FS/GS", "a data segment"),
        };
        let rpl = (e.result & 3) as u8;
        let d = matches!(e.operand as usize, seg::CS | seg::SS) && rpl != vcpl;
        (
            name,
            d,
            if d {
                format!(
                    "reading {which} at CPL{ring} gave {:#x}: RPL {rpl} reveals the real ring, the guest expects RPL {vcpl}",
                    e.result
                )
            } else {
                format!("reading {which} at CPL{ring} gave the guest's selector")
            },
        )
    }

    /// Far CALL/JMP: a CALL to kernel code pushes CS with RPL 1.
    fn audit_far_transfer(&mut self, e: &SensitiveEvent) -> Finding {
        let ring = e.cpl;
        let vcpl = if e.cpl == 3 { 3 } else { 0 };
        use SensitiveKind as K;
        let name = if e.kind == K::FarCall {
            "far CALL"
        } else {
            "far JMP"
        };
        let sel = e.operand as u16;
        // Only a far CALL shows the real CS (it pushes it); a JMP's
        // RPL shows when CS is read, which is audited then.
        let d = e.kind == K::FarCall
            && vcpl == 0
            && self
                .guest_descriptor(sel)
                .is_some_and(|d| d.is_code_data() && d.is_code() && d.dpl() == 0);
        (
            name,
            d,
            if d {
                format!(
                    "{name} to {sel:#x} at CPL{ring}: CS is loaded as {:#x} (RPL 1), the guest expects {:#x}",
                    sel | 1,
                    sel & !3
                )
            } else {
                format!("{name} to {sel:#x} at CPL{ring}")
            },
        )
    }

    pub(crate) fn audit_descriptor_probe(&mut self, e: &SensitiveEvent, vcpl: u8) -> Finding {
        use SensitiveKind as K;
        let sel = e.operand as u16;
        let ring = e.cpl;
        let name = match e.kind {
            K::Lar => "LAR",
            K::Lsl => "LSL",
            K::Verr => "VERR",
            _ => "VERW",
        };
        let d = self.guest_descriptor(sel);
        let visible = d.is_some_and(|d| {
            (d.is_code() && d.conforming()) || d.dpl() >= vcpl.max((sel & 3) as u8)
        });
        let expected: u64 = match (e.kind, d) {
            (_, None) => 0,
            (_, Some(_)) if !visible => 0,
            (K::Lar, Some(d))
                if d.is_code_data() || matches!(d.typ(), 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc) =>
            {
                (d.hi & 0x00f0_ff00) as u64
            }
            (K::Lsl, Some(d)) if d.is_code_data() || matches!(d.typ(), 1 | 2 | 3 | 9 | 0xb) => {
                d.to_segment(sel).limit as u64
            }
            (K::Verr, Some(d)) => (d.is_code_data() && d.readable()) as u64,
            (K::Verw, Some(d)) => (d.is_code_data() && d.writable_data()) as u64,
            _ => 0,
        };
        let differed = e.result != expected;
        let text = if differed {
            format!(
                "{name} {sel:#x} at CPL{ring} gave {:#x}; the guest's descriptor at its ring gives {expected:#x} (the shadow's DPL or limit shows)",
                e.result
            )
        } else {
            format!("{name} {sel:#x} at CPL{ring} gave what the guest's descriptor gives")
        };
        (name, differed, text)
    }
}
