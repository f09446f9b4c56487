//! scratch
use iced_x86::code_asm::*;
use popek_hw::guests;
use std::time::Duration;
fn main() {
    let cases: Vec<(&str, popek_hw::guests::TestGuest)> = vec![
        ("ud2", guests::long64(&|a| { a.ud2()?; guests::debug_exit(a, 1) })),
        ("div0", guests::long64(&|a| { a.xor(ecx, ecx)?; a.div(ecx)?; guests::debug_exit(a, 1) })),
        ("noncanon", guests::long64(&|a| { a.mov(rax, 0x8000_0000_0000_0000u64)?; a.mov(rax, qword_ptr(rax))?; guests::debug_exit(a, 1) })),
        ("pm32 ud2", guests::protected32(&|a| { a.ud2()?; guests::debug_exit(a, 1) })),
        ("real int3 ivt", guests::real_mode(&|a| { a.int3()?; guests::debug_exit(a, 1) })),
        ("hc", guests::long64(&|a| { a.mov(eax, 0u32)?; a.mov(dx, 0x5650u32)?; a.in_(eax, dx)?; guests::debug_exit(a, 7) })),
    ];
    for (n, g) in cases {
        let r = popek_hw::probe::run_guest(&g, 2 << 20, Duration::from_secs(2));
        println!("{n}: {:?}", r.map(|e| format!("{e:?}").chars().take(300).collect::<String>()));
    }
}
