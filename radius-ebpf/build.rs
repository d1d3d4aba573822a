//! Rebuild the object when bpf-linker changes (aya-template's habit).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
