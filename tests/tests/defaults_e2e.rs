//! The embedded defaults against Debian 12's own FreeRADIUS (3.2.1), as a new user runs
//! them: no configuration file, no BlastRADIUS switch set. NASes mix EAP (PEAP, TTLS), whose
//! packets always carry a Message-Authenticator (RFC 3579), with PAP, which 3.2.1 does not
//! sign: an EAP exchange must not teach `auto` that PAP replies (or PAP requests) must be
//! signed. Both steering paths. Run as root.

use std::time::Duration;

use tests::*;

/// The embedded default's upstream secret and NAS secret (config/default.toml).
const UPSTREAM_SECRET: &str = "sidecar-to-freeradius";
const NAS_SECRET: &str = "testing123";
const METRICS: &str = "127.0.0.1:9812";
const USERS: &str =
    "alice\tCleartext-Password := \"alice-pw\"\nbob\tCleartext-Password := \"bob-pw\"\n";

fn eapol_test(ns: &NetNs, network: &str) -> Result<(), String> {
    let conf = std::env::temp_dir().join(format!(
        "rs-defaults-eap-{}-{}.conf",
        std::process::id(),
        network.len()
    ));
    std::fs::write(
        &conf,
        format!("network={{\n key_mgmt=IEEE8021X\n eapol_flags=0\n{network}}}\n"),
    )
    .expect("eapol_test config");
    let out = ns
        .command("eapol_test")
        .args(["-c", conf.to_str().expect("utf-8"), "-a", "127.0.0.1"])
        .args(["-p", "1812", "-s", NAS_SECRET, "-t", "10"])
        .output()
        .expect("eapol_test (package eapoltest)");
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && text.contains("SUCCESS") {
        Ok(())
    } else {
        Err(text.lines().rev().take(25).collect::<Vec<_>>().join("\n"))
    }
}

fn pap(ns: &NetNs) -> Result<(), String> {
    let child = spawn_radclient(
        ns,
        &[
            "-x",
            "-r",
            "2",
            "-t",
            "2",
            "127.0.0.1:1812",
            "auth",
            NAS_SECRET,
        ],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    let out = child.wait_with_output().expect("radclient");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && text.contains("Received Access-Accept") {
        Ok(())
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn eap_and_pap_mixed_on_the_embedded_defaults(fast: bool) {
    if !require_root("defaults e2e") {
        return;
    }
    let ns = NetNs::new(if fast { "deffast" } else { "defuser" });
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UPSTREAM_SECRET)], USERS, 11812);
    // No --config: the embedded default. Only the steering path is chosen.
    let args: &[&str] = if fast {
        &["--require-ebpf"]
    } else {
        &["--no-ebpf"]
    };
    let mut d = Daemon::start(&ns, None, args);
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "the sidecar starts on its embedded defaults: {}",
        d.log()
    );
    let peap = " eap=PEAP\n identity=\"bob\"\n password=\"bob-pw\"\n phase2=\"auth=MSCHAPV2\"\n";
    let ttls = " eap=TTLS\n identity=\"alice\"\n password=\"alice-pw\"\n phase2=\"auth=PAP\"\n";
    enum Step {
        Eap(&'static str),
        Pap,
    }
    let steps = [
        ("PEAP", Step::Eap(peap)),
        ("PAP after PEAP", Step::Pap),
        ("PAP again", Step::Pap),
        ("TTLS", Step::Eap(ttls)),
        ("PAP after TTLS", Step::Pap),
    ];
    for (name, step) in steps {
        let outcome = match step {
            Step::Eap(network) => eapol_test(&ns, network),
            Step::Pap => pap(&ns),
        };
        if let Err(why) = outcome {
            panic!("{name} not answered:\n{why}\n--- sidecar ---\n{}", d.log());
        }
    }
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(
        m("radius_proxy_drops_total{reason=\"upstream_no_message_authenticator\"}"),
        0
    );
    assert_eq!(
        m("radius_proxy_drops_total{reason=\"no_message_authenticator\"}"),
        0
    );
    let text = metrics_text(&ns, METRICS);
    for peer in [
        "peer=\"upstream\",name=\"local-freeradius\"",
        "peer=\"client\",name=\"localhost\"",
    ] {
        let line = format!("radius_message_authenticator_required{{{peer}}} 0");
        assert!(
            text.lines().any(|l| l == line),
            "EAP taught nothing: `{line}` missing from\n{text}"
        );
    }
    assert_eq!(m("radius_fast_path"), u64::from(fast));
}

#[test]
fn fast_path_eap_and_pap_mixed_on_the_embedded_defaults() {
    eap_and_pap_mixed_on_the_embedded_defaults(true);
}

#[test]
fn user_space_path_eap_and_pap_mixed_on_the_embedded_defaults() {
    eap_and_pap_mixed_on_the_embedded_defaults(false);
}
