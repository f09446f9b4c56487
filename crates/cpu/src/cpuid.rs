//! The CPUID model: what the virtual processor says it is.
//!
//! Only features the model implements are advertised. The default describes
//! a P6-class (i686) processor with x87, TSC, MSR, CX8, SEP, PGE, CMOV, PSE,
//! FXSR, and no SSE (the SSE instructions are not implemented yet).

/// One CPUID leaf's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidLeaf {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// A configurable CPUID table.
#[derive(Clone, Debug)]
pub struct CpuidModel {
    /// Basic leaves 0..
    pub basic: Vec<CpuidLeaf>,
    /// Extended leaves 0x8000_0000..
    pub extended: Vec<CpuidLeaf>,
}

/// CPUID.1:EDX feature bits.
pub mod edx1 {
    /// x87 FPU on chip.
    pub const FPU: u32 = 1 << 0;
    /// Virtual-8086 mode enhancements.
    pub const VME: u32 = 1 << 1;
    /// Debugging extensions.
    pub const DE: u32 = 1 << 2;
    /// Page size extension.
    pub const PSE: u32 = 1 << 3;
    /// Time stamp counter.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// SYSENTER/SYSEXIT.
    pub const SEP: u32 = 1 << 11;
    /// Page global enable.
    pub const PGE: u32 = 1 << 13;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
    /// FXSAVE/FXRSTOR.
    pub const FXSR: u32 = 1 << 24;
}

fn ascii(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

impl Default for CpuidModel {
    fn default() -> Self {
        use edx1::*;
        let brand = *b"popek virtual CPU (interp)\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let mut ext = vec![CpuidLeaf {
            eax: 0x8000_0004,
            ..Default::default()
        }];
        ext.push(CpuidLeaf::default());
        for chunk in brand.chunks(16) {
            let w =
                |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
            ext.push(CpuidLeaf {
                eax: w(0),
                ebx: w(4),
                ecx: w(8),
                edx: w(12),
            });
        }
        CpuidModel {
            basic: vec![
                CpuidLeaf {
                    eax: 1,
                    ebx: ascii(b"Genu"),
                    edx: ascii(b"ineI"),
                    ecx: ascii(b"ntel"),
                },
                CpuidLeaf {
                    // Family 6, model 8 (Pentium III class), stepping 3.
                    eax: 0x0000_0683,
                    ebx: 0,
                    ecx: 0,
                    edx: FPU | DE | PSE | TSC | MSR | CX8 | SEP | PGE | CMOV | FXSR,
                },
            ],
            extended: ext,
        }
    }
}

impl CpuidModel {
    /// The answer for leaf `eax` (subleaf `ecx` unused so far). Leaves
    /// beyond the maximum answer like the highest basic leaf, as Intel CPUs do.
    pub fn query(&self, eax: u32, _ecx: u32) -> CpuidLeaf {
        if eax >= 0x8000_0000 {
            let i = (eax - 0x8000_0000) as usize;
            if let Some(l) = self.extended.get(i) {
                return *l;
            }
        } else if let Some(l) = self.basic.get(eax as usize) {
            return *l;
        }
        self.basic.last().copied().unwrap_or_default()
    }
}
