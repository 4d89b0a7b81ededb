//! The release build links the functions daemons run in the order of
//! scripts/hot-symbols.txt (see .cargo/config.toml), a file cargo cannot see as an
//! input: this makes a change to it rebuild the binary.
fn main() {
    println!("cargo:rerun-if-changed=scripts/hot-symbols.txt");
}
