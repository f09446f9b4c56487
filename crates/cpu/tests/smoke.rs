//! Smoke tests of the run loop on small assembled programs.

mod common;
use common::*;
use iced_x86::code_asm::*;
use popek_cpu::RunExit;

#[test]
fn loop_sum_and_hlt() {
    let mut c = cpu(1);
    let code = asm32(0x1000, |a| {
        a.mov(eax, 0u32).unwrap();
        a.mov(ecx, 100u32).unwrap();
        let mut top = a.create_label();
        a.set_label(&mut top).unwrap();
        a.add(eax, ecx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.mov(dword_ptr(0x2000), eax).unwrap();
        a.hlt().unwrap();
    });
    start_flat(&mut c, 0x1000, &code);
    let mut bus = TestBus::default();
    assert_eq!(run_to_hlt(&mut c, &mut bus), RunExit::Halted);
    assert_eq!(c.state().gpr[0], 5050);
    assert_eq!(c.ram().read_u32(0x2000).unwrap(), 5050);
}
