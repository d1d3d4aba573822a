//! End to end: real NAS clients (radclient, eapol_test) in their own namespaces send
//! through the sidecar to a real FreeRADIUS, on the fast path and on the user-space path.
//! NAS and upstream secrets differ; every answer the clients accept was verified by them
//! under their own secret. Run as root.

use std::time::Duration;

use tests::*;

const METRICS: &str = "127.0.0.1:9812";
const UPSTREAM_SECRET: &str = "sidecar-upstream-9";
const NAS1_SECRET: &str = "nas-one-secret";
const NAS2_SECRET: &str = "nas-two-secret";

const USERS: &str = r#"alice	Cleartext-Password := "alice-pw"
	Reply-Message := "hello alice"

bob	Cleartext-Password := "bob-pw"
	Reply-Message := "hello bob"
"#;

struct Setup {
    topo: Topology,
    _fr: FreeRadius,
    daemon: Daemon,
    _config: std::path::PathBuf,
}

fn setup(fast: bool) -> Setup {
    let topo = Topology::new();
    let fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let config = std::env::temp_dir().join(format!(
        "rs-e2e-{}-{}.toml",
        std::process::id(),
        if fast { "fast" } else { "user" }
    ));
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = ["0.0.0.0:1812", "0.0.0.0:1813"]
workers = 2
iface = "sc1"
ebpf = "{}"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
acct = "127.0.0.1:11813"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{NAS1_SECRET}"

[[client]]
prefix = "198.51.100.0/24"
name = "nas2"
secret = "{NAS2_SECRET}"
require_message_authenticator = true
"#,
            if fast { "require" } else { "off" }
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&topo.sidecar, None, &["--config", config.to_str().unwrap()]);
    assert!(
        daemon.wait_for_log("listening", Duration::from_secs(20)),
        "the sidecar starts"
    );
    assert!(
        daemon.wait_for_log("upstream answers Status-Server", Duration::from_secs(5)),
        "the start-up probe reaches FreeRADIUS: {}",
        daemon.log()
    );
    Setup {
        topo,
        _fr: fr,
        daemon,
        _config: config,
    }
}

/// Runs radclient in `ns` and returns (exit success, stdout).
fn radclient(ns: &NetNs, target: &str, kind: &str, secret: &str, input: &str) -> (bool, String) {
    run_radclient(
        ns,
        &["-x", "-r", "2", "-t", "2", target, kind, secret],
        input,
    )
}

fn nas_requests_are_answered_under_each_nas_secret(fast: bool) {
    if !require_root("proxy e2e") {
        return;
    }
    let s = setup(fast);
    let nas1 = &s.topo.nas1;
    let to_auth = format!("{SIDECAR1_V4}:1812");
    let to_acct = format!("{SIDECAR1_V4}:1813");

    // PAP.
    let (ok, out) = radclient(
        nas1,
        &to_auth,
        "auth",
        NAS1_SECRET,
        "User-Name = alice, User-Password = alice-pw, NAS-IP-Address = 192.0.2.2\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    assert!(out.contains("hello alice"), "{out}");
    // CHAP (radclient computes CHAP-Password from the clear text).
    let (ok, out) = radclient(
        nas1,
        &to_auth,
        "auth",
        NAS1_SECRET,
        "User-Name = bob, CHAP-Password = bob-pw, NAS-IP-Address = 192.0.2.2\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    // A wrong password is rejected (and the Reject verifies under the NAS's secret).
    let (_, out) = radclient(
        nas1,
        &to_auth,
        "auth",
        NAS1_SECRET,
        "User-Name = bob, User-Password = wrong\n",
    );
    assert!(out.contains("Received Access-Reject"), "{out}");
    // Accounting Start, Interim-Update, Stop.
    for status in ["Start", "Interim-Update", "Stop"] {
        let (ok, out) = radclient(
            nas1,
            &to_acct,
            "acct",
            NAS1_SECRET,
            &format!(
                "User-Name = alice, Acct-Status-Type = {status}, Acct-Session-Id = \"e2e-1\", \
                 NAS-IP-Address = 192.0.2.2\n"
            ),
        );
        assert!(
            ok && out.contains("Received Accounting-Response"),
            "{status}: {out}"
        );
    }

    // NAS2 has its own secret and requires a Message-Authenticator.
    let to2 = format!("{SIDECAR2_V4}:1812");
    let (ok, out) = radclient(
        &s.topo.nas2,
        &to2,
        "auth",
        NAS2_SECRET,
        "User-Name = alice, User-Password = alice-pw, Message-Authenticator = 0x00\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    // Without the Message-Authenticator, or with another NAS's secret: dropped, counted.
    let (ok, _) = radclient(
        &s.topo.nas2,
        &to2,
        "auth",
        NAS2_SECRET,
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(
        !ok,
        "a request without the required Message-Authenticator is not answered"
    );
    let (ok, _) = radclient(
        &s.topo.nas2,
        &to2,
        "auth",
        NAS1_SECRET,
        "User-Name = alice, User-Password = alice-pw, Message-Authenticator = 0x00\n",
    );
    assert!(!ok, "a request signed with another secret is not answered");
    let drops = |r: &str| {
        metric(
            &s.topo.sidecar,
            METRICS,
            &format!("radius_proxy_drops_total{{reason=\"{r}\"}}"),
        )
    };
    assert!(drops("no_message_authenticator") >= 1);
    assert!(drops("bad_signature") >= 1);
    assert!(metric(&s.topo.sidecar, METRICS, "radius_relayed_total") >= 7);
    assert_eq!(
        metric(&s.topo.sidecar, METRICS, "radius_fast_path"),
        u64::from(fast)
    );
    drop(s.daemon);
}

#[test]
fn fast_path_nas_requests_are_answered_under_each_nas_secret() {
    nas_requests_are_answered_under_each_nas_secret(true);
}

#[test]
fn user_space_path_nas_requests_are_answered_under_each_nas_secret() {
    nas_requests_are_answered_under_each_nas_secret(false);
}

/// eapol_test as the NAS: EAP-MD5 (several round trips through Access-Challenge) and
/// PEAP/MSCHAPv2, whose MS-MPPE keys eapol_test checks: they must have been re-hidden for
/// the NAS's secret.
#[test]
fn eap_md5_and_peap_mschapv2_pass_through_with_mppe_keys_rehidden() {
    if !require_root("eap e2e") {
        return;
    }
    let s = setup(true);
    let dir = std::env::temp_dir();
    let md5 = dir.join(format!("rs-eap-md5-{}.conf", std::process::id()));
    std::fs::write(
        &md5,
        "network={\n key_mgmt=IEEE8021X\n eap=MD5\n identity=\"alice\"\n password=\"alice-pw\"\n eapol_flags=0\n}\n",
    )
    .unwrap();
    let peap = dir.join(format!("rs-eap-peap-{}.conf", std::process::id()));
    std::fs::write(
        &peap,
        "network={\n key_mgmt=IEEE8021X\n eap=PEAP\n identity=\"bob\"\n password=\"bob-pw\"\n \
         phase2=\"auth=MSCHAPV2\"\n eapol_flags=0\n}\n",
    )
    .unwrap();
    for (conf, extra) in [(&md5, vec!["-n"]), (&peap, vec![])] {
        let out = s
            .topo
            .nas1
            .command("eapol_test")
            .args([
                "-c",
                conf.to_str().unwrap(),
                "-a",
                SIDECAR1_V4,
                "-p",
                "1812",
                "-s",
                NAS1_SECRET,
                "-t",
                "10",
            ])
            .args(&extra)
            .output()
            .expect("eapol_test (package eapoltest)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("SUCCESS"),
            "{}: {}",
            conf.display(),
            text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
    }
}
