//! Routing by realm against real servers: three FreeRADIUS, the homes of `a.example`
//! (its realm stripped), `b.example` (kept) and everything else (`DEFAULT`, and names
//! without a realm, `NULL`); radclient (PAP) and eapol_test (PEAP) as NASes. Each home
//! answers with the User-Name it saw, so the test reads where each request went and what
//! it carried (and the Operator-Name the sidecar adds for its client, RFC 5580). A refused
//! realm gets the sidecar's own Access-Reject with its message.

use std::time::Duration;

use tests::*;

const NAS_SECRET: &str = "realm-nas-secret";
const UP_SECRET: &str = "realm-upstream-secret";

/// radclient -x from inside `ns`: PAP for `user`; what it printed.
fn pap(ns: &NetNs, user: &str, password: &str) -> (bool, String) {
    run_radclient(
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
        &format!(
            "User-Name = \"{user}\", User-Password = \"{password}\", Message-Authenticator = 0x00\n"
        ),
    )
}

#[test]
fn users_of_each_realm_reach_their_home_stripped_or_not() {
    if !require_root("realms e2e") {
        return;
    }
    let ns = NetNs::new("realms");
    let fr = |port: u16, users: &str| {
        FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, port)
    };
    let _a = fr(
        16812,
        "alice\tCleartext-Password := \"alice-pw\"\n\t\
         Reply-Message := \"home-a saw %{User-Name} from %{Operator-Name}\"\n\
         palice\tCleartext-Password := \"palice-pw\"\n",
    );
    let _b = fr(
        17812,
        "\"bob@b.example\"\tCleartext-Password := \"bob-pw\"\n\t\
         Reply-Message := \"home-b saw %{User-Name}\"\n\
         \"pbob@b.example\"\tCleartext-Password := \"pbob-pw\"\n",
    );
    let _d = fr(
        18812,
        "DEFAULT\tCleartext-Password := \"any-pw\"\n\tReply-Message := \"default saw %{User-Name}\"\n",
    );
    let mut d = sidecar_with_config(
        &ns,
        "realms",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 1

[[upstream]]
name = "home-a"
auth = "127.0.0.1:16812"
secret = "{UP_SECRET}"

[[upstream]]
name = "home-b"
auth = "127.0.0.1:17812"
secret = "{UP_SECRET}"

[[upstream]]
name = "default"
auth = "127.0.0.1:18812"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.0.0/8"
name = "nases"
secret = "{NAS_SECRET}"
upstream = "default"
operator_name = "1sidecar.example"

[[realm]]
name = "a.example"
auth = "home-a"
strip = true

[[realm]]
name = "b.example"
auth = "home-b"

[[realm]]
name = "refused.example"
reject_message = "no roaming here"

[[realm]]
name = "DEFAULT"
auth = "default"

[[realm]]
name = "NULL"
auth = "default"
"#
        ),
    );
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    for (user, password, said) in [
        (
            "alice@a.example",
            "alice-pw",
            "home-a saw alice from 1sidecar.example",
        ),
        ("bob@b.example", "bob-pw", "home-b saw bob@b.example"),
        (
            "carol@elsewhere.example",
            "any-pw",
            "default saw carol@elsewhere.example",
        ),
        ("dave", "any-pw", "default saw dave"),
    ] {
        let (ok, out) = pap(&ns, user, password);
        println!(
            "{user}: {}",
            out.lines()
                .filter(|l| l.contains("Reply-Message"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(
            ok && out.contains("Received Access-Accept") && out.contains(said),
            "{user} should be answered \"{said}\":\n{out}\n{}",
            d.log()
        );
    }
    let (_, out) = pap(&ns, "eve@refused.example", "x");
    assert!(
        out.contains("Received Access-Reject") && out.contains("no roaming here"),
        "a refused realm is rejected here with its message:\n{out}"
    );
    // PEAP: the conversation follows its realm, round trip after round trip, to a realm
    // kept (b.example) and to one stripped (a.example: the outer identity is anonymous, as
    // eduroam's are, the inner one the user's). EAP keeps its realm even there: FreeRADIUS
    // rejects a User-Name that is not the EAP identity.
    for (realm, outer, inner, password) in [
        (
            "b.example, kept",
            "pbob@b.example",
            "pbob@b.example",
            "pbob-pw",
        ),
        (
            "a.example, stripped",
            "anonymous@a.example",
            "palice",
            "palice-pw",
        ),
    ] {
        let conf = std::env::temp_dir().join(format!("rs-realm-peap-{}.conf", std::process::id()));
        std::fs::write(
            &conf,
            format!(
                "network={{\n key_mgmt=IEEE8021X\n eap=PEAP\n anonymous_identity=\"{outer}\"\n \
                 identity=\"{inner}\"\n password=\"{password}\"\n phase2=\"auth=MSCHAPV2\"\n \
                 eapol_flags=0\n}}\n"
            ),
        )
        .expect("write the eapol_test configuration");
        let out = ns
            .command("eapol_test")
            .args([
                "-c",
                conf.to_str().expect("utf-8"),
                "-a",
                "127.0.0.1",
                "-p",
                "1812",
                "-s",
                NAS_SECRET,
                "-t",
                "10",
            ])
            .output()
            .expect("eapol_test (package eapoltest)");
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "PEAP to {realm}: {}",
            if out.status.success() {
                "SUCCESS"
            } else {
                "failed"
            }
        );
        assert!(
            out.status.success() && text.contains("SUCCESS"),
            "PEAP to its realm's home ({realm}): {}\n{}",
            text.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
            d.log()
        );
        let _ = std::fs::remove_file(&conf);
    }
}

/// radclient -x from inside `ns`: an Accounting-Request of `session`; what it printed.
fn acct(ns: &NetNs, session: &str) -> (bool, String) {
    run_radclient(
        ns,
        &[
            "-x",
            "-r",
            "1",
            "-t",
            "3",
            "127.0.0.1:1813",
            "acct",
            NAS_SECRET,
        ],
        &format!(
            "User-Name = \"alice\", Acct-Status-Type = Start, Acct-Session-Id = \"{session}\"\n"
        ),
    )
}

#[test]
fn accounting_goes_to_its_pool_and_a_copy_to_each_replica() {
    if !require_root("accounting replicas e2e") {
        return;
    }
    let ns = NetNs::new("replicas");
    let users = "alice\tCleartext-Password := \"alice-pw\"\n";
    let primary = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, 16812);
    let archive = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, 17812);
    let mut d = sidecar_with_config(
        &ns,
        "replicas",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812", "127.0.0.1:1813"]
workers = 1
metrics = "127.0.0.1:9815"

[[upstream]]
name = "primary"
auth = "127.0.0.1:16812"
acct = "127.0.0.1:16813"
secret = "{UP_SECRET}"

[[upstream]]
name = "archive"
auth = "127.0.0.1:17812"
acct = "127.0.0.1:17813"
secret = "{UP_SECRET}"
timeout_ms = 3000

[[client]]
prefix = "127.0.0.0/8"
name = "nases"
secret = "{NAS_SECRET}"
upstream = "primary"
acct_replicas = ["archive"]
"#
        ),
    );
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    for i in 0..3 {
        let (ok, out) = acct(&ns, &format!("replicated-{i}"));
        assert!(ok && out.contains("Received Accounting-Response"), "{out}");
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let session = format!("replicated-{i}");
        assert_eq!(
            primary.detail_records(&session),
            1,
            "the primary has {session}"
        );
        assert_eq!(
            archive.detail_records(&session),
            1,
            "the replica has {session}"
        );
    }
    // The replica down: the NAS is still answered on the primary's answer.
    drop(archive);
    let (ok, out) = acct(&ns, "while-the-archive-is-down");
    assert!(
        ok && out.contains("Received Accounting-Response"),
        "a replica's failure is never the NAS's: {out}"
    );
    assert_eq!(primary.detail_records("while-the-archive-is-down"), 1);
    let m = |s: &str| metric(&ns, "127.0.0.1:9815", s);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while m("radius_accounting_replicas_total{reason=\"timeout\"}") == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        m("radius_accounting_replicas_total{reason=\"answered\"}"),
        3
    );
    assert_eq!(
        m("radius_accounting_replicas_total{reason=\"timeout\"}"),
        1,
        "the copy the archive missed is counted"
    );
}
