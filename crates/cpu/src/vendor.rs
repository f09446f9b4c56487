//! The CPU vendor profile: whose silicon the virtual CPU reproduces where
//! the manuals leave behaviour open.
//!
//! Intel's SDM and AMD's APM leave some results undefined (flags after
//! multi-bit shifts, MUL and DIV, the BCD adjusts, the upper half of a
//! 32-bit PUSH of a segment register, SHLD/SHRD of a 16-bit operand by more
//! than 16…), and each vendor's processors define them differently. A real
//! CPU is one deterministic machine, so the virtual CPU is too: every engine
//! follows the profile in [`CpuState::vendor`](crate::CpuState), which
//! also decides what CPUID reports. The default is the host's vendor, so
//! that code the binary translator runs natively gives exactly the model's
//! results. `docs/cpu.md` lists the differences and where each was
//! measured.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// A CPU vendor whose processors the virtual CPU imitates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Vendor {
    /// Intel ("GenuineIntel"): the behaviour of Intel Core processors.
    #[default]
    Intel = 0,
    /// AMD ("AuthenticAMD"): the behaviour of AMD Zen processors.
    Amd = 1,
}

/// What CPUID reports for a profile: vendor string, family, model, stepping
/// and brand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuIdentity {
    /// The 12-byte vendor string of CPUID leaf 0.
    pub vendor: &'static [u8; 12],
    /// Family (CPUID.1:EAX bits 11:8).
    pub family: u8,
    /// Model (bits 7:4).
    pub model: u8,
    /// Stepping (bits 3:0).
    pub stepping: u8,
    /// The brand string (CPUID 0x8000_0002..4), at most 47 bytes.
    pub brand: &'static str,
}

impl Vendor {
    /// Both profiles.
    pub const ALL: [Vendor; 2] = [Vendor::Intel, Vendor::Amd];

    /// The host processor's vendor (Intel on non-x86 hosts and on x86
    /// processors of other vendors, whose behaviour is closest to it).
    pub fn host() -> Vendor {
        static HOST: OnceLock<Vendor> = OnceLock::new();
        *HOST.get_or_init(|| {
            if host_vendor_string() == *b"AuthenticAMD" {
                Vendor::Amd
            } else {
                Vendor::Intel
            }
        })
    }

    /// The profile's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
        }
    }

    /// What CPUID reports under this profile. The feature set is the same
    /// P6-class one for both (see [`crate::cpuid`]); family and model are
    /// those of a processor of the vendor with that feature set, so that
    /// guest kernels take their plain paths for it.
    pub fn identity(self) -> CpuIdentity {
        match self {
            // Pentium III (Katmai class): family 6, model 8.
            Vendor::Intel => CpuIdentity {
                vendor: b"GenuineIntel",
                family: 6,
                model: 8,
                stepping: 3,
                brand: "popek virtual CPU (intel profile)",
            },
            // Athlon (Thunderbird class): family 6, model 4. Later K7
            // models make Linux enable SSE through an MSR.
            Vendor::Amd => CpuIdentity {
                vendor: b"AuthenticAMD",
                family: 6,
                model: 4,
                stepping: 2,
                brand: "popek virtual CPU (amd profile)",
            },
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown vendor profile name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownVendor(pub String);

impl fmt::Display for UnknownVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown CPU vendor profile '{}' (intel, amd)", self.0)
    }
}

impl std::error::Error for UnknownVendor {}

impl FromStr for Vendor {
    type Err = UnknownVendor;

    fn from_str(s: &str) -> Result<Vendor, UnknownVendor> {
        match s.to_ascii_lowercase().as_str() {
            "intel" | "genuineintel" => Ok(Vendor::Intel),
            "amd" | "authenticamd" => Ok(Vendor::Amd),
            _ => Err(UnknownVendor(s.to_string())),
        }
    }
}

/// Whether BSF and BSR on AMD processors leave CF, OF, SF, AF and PF as
/// they were (writing only ZF), as Zen 3 does — family 19h model 01h,
/// measured — or clear CF, OF, SF and AF and set PF from the index, as
/// Intel processors and Zen 4 (family 19h model 11h) do. The manuals call
/// those flags undefined; AMD generations differ. On an AMD host the
/// answer is the host's, probed once, so that code the binary translator
/// runs natively agrees with the model; elsewhere Zen 4's.
pub fn amd_bitscan_keeps_flags() -> bool {
    static KEEPS: OnceLock<bool> = OnceLock::new();
    *KEEPS.get_or_init(|| Vendor::host() == Vendor::Amd && host_bitscan_keeps_flags())
}

/// Runs BSF on the host with CF, PF, AF, SF and OF set and a source of 1:
/// true when they are still set after it.
fn host_bitscan_keeps_flags() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let flags: u64;
        // SAFETY: register-only instructions and a balanced push/pop on
        // the stack Rust gave the asm block (no `nostack`); POPFQ changes
        // only the arithmetic flags (TF, DF, IF stay clear/as user mode
        // allows).
        unsafe {
            std::arch::asm!(
                "push 0x895",
                "popfq",
                "mov {s:e}, 1",
                "bsf {d:e}, {s:e}",
                "pushfq",
                "pop {f}",
                s = out(reg) _,
                d = out(reg) _,
                f = out(reg) flags,
            );
        }
        // CF, AF, SF, OF (PF is 1 either way: the index is 0).
        flags & 0x891 == 0x891
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The host's CPUID vendor string (zeros where there is no CPUID).
pub fn host_vendor_string() -> [u8; 12] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 processor.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut v = [0u8; 12];
        v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
        v
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        [0; 12]
    }
}

/// The host processor's signature, CPUID leaf 1's EAX (what EDX holds after
/// RESET on the host, and on a hardware engine's vCPU).
pub fn host_signature() -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 1 exists on every x86-64 processor.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(1) };
        r.eax
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// The host processor's family, model and brand string, for reports and
/// benchmark headers ("AMD EPYC, family 19h model 11h").
pub fn host_cpu_description() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // SAFETY: CPUID leaves 0, 1 and 0x8000_0000 exist on every x86-64
        // processor; the brand leaves are read only when leaf 0x8000_0000
        // says they exist.
        #[allow(unused_unsafe)]
        let (sig, max_ext) = unsafe { (__cpuid(1).eax, __cpuid(0x8000_0000).eax) };
        let base_family = (sig >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((sig >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 6 || base_family == 0xf {
            ((sig >> 4) & 0xf) | (((sig >> 16) & 0xf) << 4)
        } else {
            (sig >> 4) & 0xf
        };
        let mut brand = Vec::new();
        if max_ext >= 0x8000_0004 {
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                // SAFETY: see above.
                #[allow(unused_unsafe)]
                let r = unsafe { __cpuid(leaf) };
                for w in [r.eax, r.ebx, r.ecx, r.edx] {
                    brand.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        let brand = String::from_utf8_lossy(&brand)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string();
        let vendor = String::from_utf8_lossy(&host_vendor_string()).to_string();
        format!("{brand} ({vendor}, family {family:x}h model {model:x}h)")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "not an x86 host".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for v in Vendor::ALL {
            assert_eq!(v.name().parse::<Vendor>(), Ok(v));
            assert_eq!(v.to_string(), v.name());
        }
        assert_eq!("AuthenticAMD".parse::<Vendor>(), Ok(Vendor::Amd));
        assert!("via".parse::<Vendor>().is_err());
    }

    #[test]
    fn the_host_profile_matches_the_host_vendor_string() {
        let s = host_vendor_string();
        let expect = if &s == b"AuthenticAMD" {
            Vendor::Amd
        } else {
            Vendor::Intel
        };
        assert_eq!(Vendor::host(), expect);
        assert!(host_cpu_description().contains("family"));
    }
}
