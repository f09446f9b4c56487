//! Facts about instructions that more than one part of popek needs (the
//! software CPU's decoder, the binary translator's classifier), kept once.

use iced_x86::{Code, Mnemonic};

include!(concat!(env!("OUT_DIR"), "/code_facts.rs"));

/// The operand-size attribute an instruction's encoding fixes (16, 32 or
/// 64 bits), or 0 when it follows the code size. As iced's
/// `OpCodeInfo::operand_size`, from a table extracted at build time.
#[inline]
pub fn operand_size(code: Code) -> u32 {
    match CODE_FACTS.get(code as usize).map_or(0, |b| b & 3) {
        1 => 16,
        2 => 32,
        3 => 64,
        _ => 0,
    }
}

/// Whether `code` is an x87 instruction (legacy escape opcodes D8–DF).
#[inline]
pub fn is_x87(code: Code) -> bool {
    CODE_FACTS.get(code as usize).is_some_and(|b| b & 4 != 0)
}

/// Instructions that read and write their first operand.
pub fn is_rmw(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Inc
            | Dec
            | Neg
            | Not
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Xadd
            | Xchg
            | Cmpxchg
            | Cmpxchg8b
            | Bts
            | Btr
            | Btc
    )
}

/// Instructions a LOCK prefix is legal on (with a memory destination): the
/// read-modify-write ones but the shifts and rotates (SDM, LOCK).
pub fn lock_legal(m: Mnemonic) -> bool {
    use Mnemonic::*;
    is_rmw(m)
        && !matches!(
            m,
            Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_legal_on_rmw_but_shifts() {
        assert!(lock_legal(Mnemonic::Add) && lock_legal(Mnemonic::Cmpxchg8b));
        assert!(is_rmw(Mnemonic::Shl) && !lock_legal(Mnemonic::Shl));
        assert!(!is_rmw(Mnemonic::Mov) && !lock_legal(Mnemonic::Mov));
    }
}

#[cfg(test)]
mod code_fact_tests {
    use super::*;

    #[test]
    fn the_build_time_table_agrees_with_iced() {
        for c in Code::values() {
            let oc = c.op_code();
            assert_eq!(operand_size(c), oc.operand_size(), "{c:?}");
            let x87 = oc.encoding() == iced_x86::EncodingKind::Legacy
                && oc.table() == iced_x86::OpCodeTableKind::Normal
                && (0xd8..=0xdf).contains(&oc.op_code());
            assert_eq!(is_x87(c), x87, "{c:?}");
        }
    }
}
