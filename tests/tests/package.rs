//! The Debian package (`cargo xtask deb`, built by `cargo xtask test` before the tests and
//! named in `RADIUS_SIDECAR_DEB`): `dpkg -i` installs it on this machine, with its user,
//! unit, man page and completions where Debian looks for them and the default
//! configuration as a conffile; `check-config` passes on that conffile; `dpkg -r` removes
//! it and keeps the operator's configuration; `dpkg --purge` leaves nothing.

use std::{path::Path, process::Command};

use tests::require_root;

const PACKAGE: &str = "radius-sidecar";
const CONFFILE: &str = "/etc/radius-sidecar/sidecar.toml";

fn dpkg(args: &[&str]) -> (bool, String) {
    let out = Command::new("dpkg").args(args).output().expect("dpkg");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_package_installs_checks_its_conffile_and_removes_cleanly() {
    if !require_root("the Debian package") {
        return;
    }
    let Ok(deb) = std::env::var("RADIUS_SIDECAR_DEB") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "RADIUS_SIDECAR_DEB is unset: `cargo xtask test` builds the package first"
        );
        eprintln!("skipped: RADIUS_SIDECAR_DEB unset (run `cargo xtask test`)");
        return;
    };
    // Left by an earlier run that failed half-way.
    let _ = dpkg(&["--purge", PACKAGE]);

    let (ok, said) = dpkg(&["-i", &deb]);
    assert!(ok, "dpkg -i {deb}: {said}");
    let (_, files) = dpkg(&["-L", PACKAGE]);
    for want in [
        "/usr/bin/radius-sidecar",
        "/radius-sidecar.service",
        "/usr/share/man/man8/radius-sidecar.8.gz",
        "/usr/share/man/man8/radius-sidecar-reload.8.gz",
        "/usr/share/man/man8/radius-sidecar-check-config.8.gz",
        "/usr/share/bash-completion/completions/radius-sidecar",
        "/usr/share/zsh/vendor-completions/_radius-sidecar",
        "/usr/share/fish/vendor_completions.d/radius-sidecar.fish",
        CONFFILE,
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(want)),
            "{want} in the package: {files}"
        );
    }
    let conffiles = Command::new("dpkg-query")
        .args(["-W", "-f=${Conffiles}", PACKAGE])
        .output()
        .expect("dpkg-query");
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains(CONFFILE),
        "the configuration is a conffile"
    );
    assert!(
        Command::new("getent")
            .args(["passwd", PACKAGE])
            .output()
            .is_ok_and(|o| o.status.success()),
        "postinst made the service user"
    );
    let check = Command::new("/usr/bin/radius-sidecar")
        .args(["--config", CONFFILE, "check-config"])
        .output()
        .expect("the installed binary");
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && said.contains("configuration OK"),
        "check-config on the installed conffile: {said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let man = Command::new("zcat")
        .arg("/usr/share/man/man8/radius-sidecar.8.gz")
        .output()
        .expect("zcat");
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.contains(".TH radius-sidecar 8")
            && man.contains("reload")
            && man.contains("check\\-config"),
        "the man page, section 8, lists the commands: {man}"
    );
    println!("installed: {deb}; check-config: {}", said.trim());

    let (ok, said) = dpkg(&["-r", PACKAGE]);
    assert!(ok, "dpkg -r: {said}");
    assert!(
        !Path::new("/usr/bin/radius-sidecar").exists(),
        "the binary removed"
    );
    assert!(
        Path::new(CONFFILE).exists(),
        "dpkg -r keeps the operator's configuration"
    );
    let (ok, said) = dpkg(&["--purge", PACKAGE]);
    assert!(ok, "dpkg --purge: {said}");
    assert!(!Path::new(CONFFILE).exists(), "purge removes the conffile");
    let (installed, _) = dpkg(&["-s", PACKAGE]);
    assert!(!installed, "nothing left of the package");
}
