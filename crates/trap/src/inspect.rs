//! What `trap` shows of itself: statistics, the trap trace switch, the
//! audit table and the watchdog's stall hint.

use super::*;

impl Inspect for Trap {
    fn audit(&self) -> Option<Vec<AuditRow>> {
        Some(self.audit.rows())
    }

    fn stall_hint(&mut self) -> Option<String> {
        let rows: Vec<AuditRow> = self
            .audit
            .rows()
            .into_iter()
            .filter(|r| r.differed > 0)
            .collect();
        // The gap explains a virtual IF stuck at 0 only if the guest really
        // tried to set IF where the CPU ignored it.
        let if_lost = self.audit.last_if_loss.is_some();
        if (self.v.vif || !if_lost) && rows.is_empty() {
            return None;
        }
        let mut s = if self.v.vif || !if_lost {
            String::from(
                "popek: the audit: the deprivileged guest kernel saw results that differ from ring 0",
            )
        } else {
            String::from(
                "popek: the audit explains it: the guest kernel runs at ring 1 with IOPL 0, so the \
                 CPU ignores its attempts to set IF with POPF or IRET (x86 gap), and the virtual IF \
                 stayed 0",
            )
        };
        if !self.v.vif && if_lost {
            if let Some(l) = &self.audit.last_if_loss {
                s.push_str(&format!(
                    ".\n  last lost attempt: {} at {:#010x} (CPL{}): {}",
                    l.instruction, l.address, l.cpl, l.consequence
                ));
            }
            if let Some(a) = self.last_cli {
                s.push_str(&format!(
                    "\n  IF was last cleared by the emulated CLI at {a:#010x}"
                ));
            }
        }
        for r in &rows {
            s.push_str(&format!(
                "\n  {:<28} ran {:>8}, differed {:>8}: {}",
                r.instruction, r.count, r.differed, r.consequence
            ));
        }
        Some(s)
    }

    fn detail_stats(&self) -> Vec<(String, u64)> {
        self.stats
            .traps
            .iter()
            .map(|(k, v)| (format!("trap: {k}"), *v))
            .collect()
    }

    fn set_trace_traps(&mut self, on: bool) {
        self.trace = on;
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        let sh = &self.shadow.stats;
        vec![
            ("instructions", self.cpu.icount),
            ("traps", s.total),
            ("events reflected into the guest", s.reflected),
            ("hidden page faults", s.hidden_pf),
            ("true page faults", s.true_pf),
            ("write-protect traps", s.wp_traps),
            ("CR3 switches", s.cr3_switches),
            ("shadow syncs (whole shadow rebuilt)", sh.syncs),
            ("shadow PTEs filled", sh.fills),
            ("shadow entries dropped", sh.zaps),
            (
                "64 KiB chunks of guest RAM at another host-physical address",
                self.map.moved_chunks() as u64,
            ),
            ("gap instructions executed", self.audit.events),
            ("gap instructions that differed", self.audit.differed),
            (
                "isolation breaks (monitor tables changed, real ring 0)",
                self.isolation_check().is_err() as u64,
            ),
            (
                "decoded-block cache, KiB",
                self.cpu.block_cache_bytes() as u64 >> 10,
            ),
            (
                "decoded-block cache flushes",
                self.cpu.stats.block_cache_flushes,
            ),
        ]
    }
}
