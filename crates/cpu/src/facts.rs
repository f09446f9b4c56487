//! Facts about instructions that more than one part of popek needs (the
//! software CPU's decoder, the binary translator's classifier), kept once.

use iced_x86::Mnemonic;

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
