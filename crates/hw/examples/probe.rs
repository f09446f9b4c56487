//! Prints what the KVM capability probe finds (without the cache).
fn main() {
    print!("{}", popek_hw::probe::probe_now().report());
}
