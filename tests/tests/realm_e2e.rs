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
         Reply-Message := \"home-a saw %{User-Name} from %{Operator-Name}\"\n",
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
    // PEAP: the conversation follows its realm, round trip after round trip.
    let conf = std::env::temp_dir().join(format!("rs-realm-peap-{}.conf", std::process::id()));
    std::fs::write(
        &conf,
        "network={\n key_mgmt=IEEE8021X\n eap=PEAP\n identity=\"pbob@b.example\"\n \
         password=\"pbob-pw\"\n phase2=\"auth=MSCHAPV2\"\n eapol_flags=0\n}\n",
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
    assert!(
        out.status.success() && text.contains("SUCCESS"),
        "PEAP to its realm's home: {}",
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let _ = std::fs::remove_file(&conf);
}
