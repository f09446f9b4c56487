//! The Popek–Goldberg audit: every sensitive but unprivileged instruction
//! the deprivileged guest executed, and whether its result differed from
//! what the guest would have seen at its virtual privilege level.

use std::collections::BTreeMap;

use popek_engine::AuditRow;

/// One instruction's record.
#[derive(Clone, Debug, Default)]
struct Row {
    count: u64,
    differed: u64,
    first: u64,
    first_differed: Option<u64>,
    first_consequence: String,
    differed_consequence: Option<String>,
}

/// A differing run that left the virtual IF where the guest did not want
/// it (the usual cause of a deprivileged guest's stall).
#[derive(Clone, Debug)]
pub struct IfLoss {
    /// Instruction.
    pub instruction: &'static str,
    /// Guest linear address.
    pub address: u64,
    /// Real CPL it ran at.
    pub cpl: u8,
    /// What it tried to do.
    pub consequence: String,
}

/// The audit.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    rows: BTreeMap<&'static str, Row>,
    /// The last POPF/IRET that tried to set IF and was ignored.
    pub last_if_loss: Option<IfLoss>,
    /// Gap events in all.
    pub events: u64,
    /// Differing gap events in all.
    pub differed: u64,
}

impl Audit {
    /// Records one run of `instruction` at `address`.
    pub fn record(
        &mut self,
        instruction: &'static str,
        address: u64,
        differed: bool,
        consequence: impl FnOnce() -> String,
    ) {
        self.events += 1;
        let row = self.rows.entry(instruction).or_default();
        row.count += 1;
        if row.count == 1 {
            row.first = address;
        }
        if differed {
            self.differed += 1;
            row.differed += 1;
            if row.first_differed.is_none() {
                row.first_differed = Some(address);
                row.differed_consequence = Some(consequence());
            }
        } else if row.count == 1 {
            row.first_consequence = consequence();
        }
    }

    /// The rows, most differing first.
    pub fn rows(&self) -> Vec<AuditRow> {
        let mut v: Vec<AuditRow> = self
            .rows
            .iter()
            .map(|(name, r)| AuditRow {
                instruction: name.to_string(),
                count: r.count,
                differed: r.differed,
                first_address: r.first,
                first_differed_address: r.first_differed,
                consequence: r
                    .differed_consequence
                    .clone()
                    .unwrap_or_else(|| r.first_consequence.clone()),
            })
            .collect();
        v.sort_by(|a, b| {
            (b.differed > 0)
                .cmp(&(a.differed > 0))
                .then(a.instruction.cmp(&b.instruction))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_counts_first_addresses_and_consequences() {
        let mut a = Audit::default();
        a.record("PUSHF", 0x100, false, || "same".into());
        a.record("PUSHF", 0x104, true, || "IF leaked".into());
        a.record("PUSHF", 0x108, true, || unreachable!());
        a.record("SGDT", 0x200, false, || "same".into());
        let rows = a.rows();
        assert_eq!(rows[0].instruction, "PUSHF");
        assert_eq!((rows[0].count, rows[0].differed), (3, 2));
        assert_eq!(rows[0].first_address, 0x100);
        assert_eq!(rows[0].first_differed_address, Some(0x104));
        assert_eq!(rows[0].consequence, "IF leaked");
        assert_eq!(rows[1].consequence, "same");
        assert_eq!((a.events, a.differed), (4, 2));
    }
}
