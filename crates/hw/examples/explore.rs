//! scratch
use iced_x86::code_asm::*;
use popek_hw::guests;
use std::time::Duration;
fn main() {
    let cases: Vec<(&str, popek_hw::guests::TestGuest)> = vec![
        ("rdrand", guests::long64(&|a| { a.rdrand(eax)?; guests::debug_exit(a, 1) })),
        ("cmpxchg16b", guests::long64(&|a| { a.mov(rdi, 0x800u64)?; a.cmpxchg16b(xmmword_ptr(rdi))?; guests::debug_exit(a, 1) })),
        ("lsl", guests::long64(&|a| { a.mov(eax, 0x10u32)?; a.lsl(ecx, eax)?; a.mov(al, cl)?; a.out(0xf4, al)?; a.hlt() })),
    ];
    for (n, g) in cases {
        let r = popek_hw::probe::run_guest(&g, 2 << 20, Duration::from_secs(2));
        println!("{n}: {:?}", r.map(|e| format!("{e:?}").chars().take(200).collect::<String>()));
    }
}
