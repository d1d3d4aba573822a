//! Builds the eBPF object (radius-ebpf) with the nightly toolchain and bpf-linker, so the
//! daemon can embed it. `RADIUS_EBPF_STUB=1` writes an empty object instead, for `cargo
//! check`/clippy on machines without the eBPF toolchain; the loader then reports the fast
//! path as unavailable. CI never sets it.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=RADIUS_EBPF_STUB");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    if env::var("RADIUS_EBPF_STUB").is_ok_and(|v| v == "1") {
        println!("cargo::warning=RADIUS_EBPF_STUB=1: embedding an empty eBPF object");
        fs::write(out.join("radius"), [])?;
        return Ok(());
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no workspace root"))?
        .join("radius-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "radius-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
