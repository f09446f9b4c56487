//! QEMU's isa-debug-exit device at port 0xf4 (4 ports, accesses of 1, 2 or
//! 4 bytes): writing v stops the machine with [`StopReason::DebugExit`]
//! carrying the low byte of v; popek then exits with status (v << 1) | 1.
//! Reads return all ones.

use crate::StopReason;

/// The port of the device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Number of ports it claims (QEMU's `iosize=4`).
pub const DEBUG_EXIT_LEN: u16 = 4;

/// The stop event for a write of `data` (little-endian, 1–4 bytes).
pub fn write(data: &[u8]) -> Option<StopReason> {
    data.first().map(|&v| StopReason::DebugExit(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_low_byte_is_reported() {
        assert_eq!(write(&[0x31]), Some(StopReason::DebugExit(0x31)));
        assert_eq!(
            write(&0x1234_5601u32.to_le_bytes()),
            Some(StopReason::DebugExit(1))
        );
        assert_eq!(write(&[]), None);
    }
}
