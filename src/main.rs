//! `popek`: the command-line front end.

fn main() {
    println!("popek");
}
