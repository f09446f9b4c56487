//! The CPUID model: what the virtual processor says it is.
//!
//! Only features the model implements are advertised: a P6-class (i686)
//! processor with x87, TSC, MSR, CX8, an on-chip APIC (with x2APIC and
//! TSC-deadline timer modes: the machine's local APIC), SEP, PGE, CMOV,
//! PSE, FXSR, and no SSE
//! (the SSE instructions are not implemented yet). Vendor string, family,
//! model and brand come from the vendor profile ([`Vendor::identity`]).

use crate::vendor::Vendor;

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
    /// The profile whose conventions answer leaves beyond the table.
    pub vendor: Vendor,
}

/// CPUID.1:ECX feature bits.
pub mod ecx1 {
    /// x2APIC mode.
    pub const X2APIC: u32 = 1 << 21;
    /// The local APIC timer's TSC-deadline mode.
    pub const TSC_DEADLINE: u32 = 1 << 24;
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
    /// Physical address extension (PAE paging).
    pub const PAE: u32 = 1 << 6;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// On-chip local APIC.
    pub const APIC: u32 = 1 << 9;
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
    /// The model for the host's vendor profile.
    fn default() -> Self {
        CpuidModel::for_vendor(Vendor::host())
    }
}

impl CpuidModel {
    /// The CPUID table of a vendor profile: the same P6-class features,
    /// with the vendor's string, family, model and brand.
    pub fn for_vendor(vendor: Vendor) -> CpuidModel {
        use edx1::*;
        let id = vendor.identity();
        let signature = ((id.family as u32) << 8) | ((id.model as u32) << 4) | id.stepping as u32;
        let features = FPU | DE | PSE | TSC | MSR | PAE | CX8 | APIC | SEP | PGE | CMOV | FXSR;
        let mut brand = [0u8; 48];
        brand[..id.brand.len().min(47)]
            .copy_from_slice(&id.brand.as_bytes()[..id.brand.len().min(47)]);
        let mut ext = vec![CpuidLeaf {
            eax: 0x8000_0004,
            ..Default::default()
        }];
        // Leaf 0x8000_0001 EDX bit 20: execute-disable (EFER.NXE, PAE).
        let nx = 1 << 20;
        ext.push(match vendor {
            Vendor::Intel => CpuidLeaf {
                edx: nx,
                ..Default::default()
            },
            // AMD repeats the signature and the x87/MSR/paging feature bits
            // in leaf 0x8000_0001 (SEP's bit means SYSCALL there: clear).
            Vendor::Amd => CpuidLeaf {
                eax: signature,
                edx: (features & !(SEP | FXSR) & 0x0183_f3ff) | nx,
                ..Default::default()
            },
        });
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
        if vendor == Vendor::Amd {
            // Leaves 0x8000_0005–6 (caches) empty; 0x8000_0008: 32
            // physical and linear address bits, and XSaveErPtr (FXSAVE
            // always stores the x87 error pointers, as the model's does).
            // Without it Linux works around the K7/K8 "FXSAVE leak" with
            // EMMS, an MMX instruction this P6-class CPU lacks.
            ext[0].eax = 0x8000_0008;
            ext.extend([CpuidLeaf::default(); 2]);
            // 0x8000_0007: the invariant TSC (EDX bit 8). The TSC counts
            // machine time at one rate on every vCPU; without the bit Linux
            // takes a multi-processor AMD machine's TSCs to be unsynchronized.
            ext.push(CpuidLeaf {
                edx: 1 << 8,
                ..Default::default()
            });
            ext.push(CpuidLeaf {
                eax: 0x2020,
                ebx: 1 << 2,
                ..Default::default()
            });
        }
        let v = id.vendor;
        CpuidModel {
            basic: vec![
                CpuidLeaf {
                    eax: 1,
                    ebx: ascii(&[v[0], v[1], v[2], v[3]]),
                    edx: ascii(&[v[4], v[5], v[6], v[7]]),
                    ecx: ascii(&[v[8], v[9], v[10], v[11]]),
                },
                CpuidLeaf {
                    eax: signature,
                    // Initial APIC ID 0, one logical processor, CLFLUSH
                    // line 64 bytes (8 quadwords).
                    ebx: (1 << 16) | (8 << 8),
                    ecx: ecx1::X2APIC | ecx1::TSC_DEADLINE,
                    edx: features,
                },
            ],
            extended: ext,
            vendor,
        }
    }

    /// The answer for leaf `eax` (subleaf `ecx` unused so far). Leaves
    /// beyond the maximum answer like the highest basic leaf on Intel
    /// processors and with zeros on AMD processors.
    pub fn query(&self, eax: u32, _ecx: u32) -> CpuidLeaf {
        if eax >= 0x8000_0000 {
            let i = (eax - 0x8000_0000) as usize;
            if let Some(l) = self.extended.get(i) {
                return *l;
            }
        } else if let Some(l) = self.basic.get(eax as usize) {
            return *l;
        }
        match self.vendor {
            Vendor::Intel => self.basic.last().copied().unwrap_or_default(),
            Vendor::Amd => CpuidLeaf::default(),
        }
    }
}
