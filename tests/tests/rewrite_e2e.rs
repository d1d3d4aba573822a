//! Attribute rewriting against a real FreeRADIUS, in both directions, each kind checked
//! where it shows: in what FreeRADIUS received (its detail file, and a Reply-Message that
//! echoes the request's attributes) and in what the NAS (radclient, which drops a reply
//! whose signature or Message-Authenticator does not verify) received. The home also sends
//! a Tunnel-Password: radclient reading it back proves it was re-hidden for the NAS after
//! the reply was rewritten.

use std::time::Duration;

use tests::*;

const NAS_SECRET: &str = "rewrite-nas-secret";
const UP_SECRET: &str = "rewrite-upstream-secret";

const CONFIG: &str = r#"[server]
listen = ["127.0.0.1:1812", "127.0.0.1:1813"]
workers = 1

[[upstream]]
name = "home"
auth = "127.0.0.1:16812"
acct = "127.0.0.1:16813"
secret = "UP_SECRET"
rewrite_out = "to-home"
rewrite_in = "from-home"

[[client]]
prefix = "127.0.0.0/8"
name = "nases"
secret = "NAS_SECRET"
rewrite_in = "from-nas"
rewrite_out = "to-nas"

# What the NASes send: only what the home needs, and the old realm renamed.
[[rewrite]]
name = "from-nas"
keep_only = ["User-Name", "User-Password", "NAS-Port-Id", "NAS-Port-Type", "Cisco",
             "Acct-Status-Type", "Acct-Session-Id", "NAS-IP-Address"]
modify = [{ attribute = "User-Name", regex = '^(.*)@old\.example$', replacement = '\1@new.example' }]

[[rewrite]]
name = "to-home"
remove = ["NAS-Port-Id", "Cisco"]
replace = ["NAS-Port-Type = Virtual"]
add = ["Connect-Info = added-by-sidecar"]
add_if_absent = ["Operator-Name = 1sidecar.example"]

[[rewrite]]
name = "from-home"
remove = ["Filter-Id"]
replace = ["Session-Timeout = 3600"]
modify = [{ attribute = "Reply-Message", regex = '^home saw', replacement = 'sidecar relayed' }]

[[rewrite]]
name = "to-nas"
add = ["Tunnel-Type:1 = VLAN", "Tunnel-Private-Group-Id:1 = 100"]
add_if_absent = ["Idle-Timeout = 600", "Class = 0x6e6f"]
"#;

const NAS_ATTRIBUTES: &str = "NAS-Port-Id = \"drop-me\", Called-Station-Id = \"not-kept\", \
     Cisco-AVPair = \"drop=me\", NAS-Port-Type = Ethernet";

#[test]
fn every_kind_of_rewrite_shows_in_what_freeradius_and_the_nas_receive() {
    if !require_root("rewrite e2e") {
        return;
    }
    let ns = NetNs::new("rewrite");
    let users = "\"alice@new.example\"\tCleartext-Password := \"alice-pw\"\n\t\
         Reply-Message := \"home saw %{User-Name} op=%{Operator-Name} port=%{NAS-Port-Id} \
         csi=%{Called-Station-Id} info=%{Connect-Info} type=%{NAS-Port-Type} \
         avpair=%{Cisco-AVPair}\",\n\t\
         Filter-Id := \"home-filter\",\n\t\
         Session-Timeout := 60,\n\t\
         Class := 0x686f6d65,\n\t\
         Tunnel-Password := \"tunnel-secret\"\n";
    let home = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, 16812);
    let config = CONFIG
        .replace("UP_SECRET", UP_SECRET)
        .replace("NAS_SECRET", NAS_SECRET);
    let mut d = sidecar_with_config(&ns, "rewrite", &config);
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );

    let (ok, out) = run_radclient(
        &ns,
        &[
            "-x",
            "-r",
            "2",
            "-t",
            "3",
            "127.0.0.1:1812",
            "auth",
            NAS_SECRET,
        ],
        &format!(
            "User-Name = \"alice@old.example\", User-Password = \"alice-pw\", \
             Message-Authenticator = 0x00, {NAS_ATTRIBUTES}\n"
        ),
    );
    println!("{out}");
    assert!(
        ok && out.contains("Received Access-Accept"),
        "the rewritten request is accepted, and its rewritten reply verifies at the NAS:\n{out}\n{}\n{}",
        d.log(),
        home.log()
    );
    let has = |what: &str, why: &str| assert!(out.contains(what), "{why}: `{what}` in\n{out}");
    let lacks =
        |what: &str, why: &str| assert!(!out.contains(what), "{why}: no `{what}` in\n{out}");
    // Requests, as FreeRADIUS saw them (echoed), then the reply as the NAS got it.
    has(
        "sidecar relayed alice@new.example op=1sidecar.example port= csi= \
         info=added-by-sidecar type=Virtual avpair=",
        "modify (User-Name, in), keep_only (Called-Station-Id), remove (NAS-Port-Id, the \
         Cisco vendor), replace (NAS-Port-Type), add (Connect-Info), add_if_absent \
         (Operator-Name); then modify (Reply-Message, out)",
    );
    lacks("home-filter", "remove in a reply");
    has("Session-Timeout = 3600", "replace in a reply");
    lacks("Session-Timeout = 60", "replace in a reply");
    has("Tunnel-Type:1 = VLAN", "add of a tagged integer");
    has(
        "Tunnel-Private-Group-Id:1 = \"100\"",
        "add of a tagged string",
    );
    has("Idle-Timeout = 600", "add_if_absent of an absent attribute");
    has(
        "Class = 0x686f6d65",
        "add_if_absent leaves a present attribute",
    );
    lacks(
        "Class = 0x6e6f",
        "add_if_absent adds nothing where one is present",
    );
    has(
        "\"tunnel-secret\"",
        "a hidden value re-hidden for the NAS after a rewrite",
    );

    // Accounting, in FreeRADIUS's detail file.
    let (ok, out) = run_radclient(
        &ns,
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
            "User-Name = \"alice@old.example\", Acct-Status-Type = Start, \
             Acct-Session-Id = \"rw-1\", {NAS_ATTRIBUTES}\n"
        ),
    );
    assert!(ok && out.contains("Received Accounting-Response"), "{out}");
    let record = home
        .detail_record("rw-1")
        .expect("the home's detail file holds the session");
    println!("{record}");
    for (line, why) in [
        ("User-Name = \"alice@new.example\"", "modify"),
        ("NAS-Port-Type = Virtual", "replace"),
        ("Connect-Info = \"added-by-sidecar\"", "add"),
        ("Operator-Name = \"1sidecar.example\"", "add_if_absent"),
    ] {
        assert!(record.contains(line), "{why}: `{line}` in\n{record}");
    }
    for gone in ["NAS-Port-Id", "Called-Station-Id", "Cisco-AVPair", "drop"] {
        assert!(!record.contains(gone), "`{gone}` removed:\n{record}");
    }
}
