//! Secrets stay secret: the sidecar runs at the most verbose log level with distinctive NAS,
//! dynamic-client and upstream secrets and user passwords, through PAP (accepted, rejected,
//! and signed with a wrong secret), EAP (PEAP), CoA, a dynamic definition from a directory
//! file and a reload of that file, and a configuration error; none of the secrets or
//! passwords may appear, in clear, in hex or as a byte list, in its log, its metrics or its
//! error messages. Run as root.

use std::{net::UdpSocket, time::Duration};

use radius_sidecar::codec::{Code, Packet, PacketMut, attr, auth};
use tests::*;

const NAS_SECRET: &str = "NasSecret-Vb9Lp4Qe";
const UP_SECRET: &str = "UpSecret-Qx7Zr2Wd";
const DYN_SECRET: &str = "DynSecret-Hn6Tw8Ys";
const DYN_SECRET_RELOADED: &str = "DynSecret2-Rc4Mq1Zk";
const ALICE_PW: &str = "Pw-Alice-8Kd3Fg";
const BOB_PW: &str = "Pw-Bob-5Jm1Xc";
const METRICS: &str = "127.0.0.1:9812";

/// Every form a leaked secret could take in text.
fn forms(secret: &str) -> Vec<String> {
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        b.iter().map(|x| format!("{x:02x}")).collect(),
        b.iter().map(|x| format!("{x:02X}")).collect(),
        format!("{b:?}").trim_matches(['[', ']']).to_owned(),
    ]
}

fn assert_no_secret(what: &str, text: &str) {
    for s in [
        NAS_SECRET,
        UP_SECRET,
        DYN_SECRET,
        DYN_SECRET_RELOADED,
        ALICE_PW,
        BOB_PW,
    ] {
        for f in forms(s) {
            assert!(
                !text.contains(&f),
                "{what} shows `{s}` (as `{f}`): {}",
                text.lines()
                    .filter(|l| l.contains(&f))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// A PAP request from `s` to the auth port; true when it is accepted (verified with
/// `secret`).
fn pap(s: &UdpSocket, id: u8, user: &str, pw: &str, secret: &str, nas_id: &str) -> bool {
    let (req, a) = pap_request(
        id,
        user,
        pw,
        secret,
        &[(attr::NAS_IDENTIFIER, nas_id.as_bytes())],
    );
    s.send_to(&req, "127.0.0.1:1812").expect("send");
    let mut b = [0u8; 4096];
    let Ok(n) = s.recv(&mut b) else {
        return false;
    };
    Packet::parse(&b[..n]).is_ok_and(|p| {
        auth::verify(&p, secret.as_bytes(), Some(&a)).is_ok() && p.code() == Code::AccessAccept
    })
}

fn socket(ns: &NetNs, ip: &'static str) -> UdpSocket {
    ns.run(move || {
        let s = nas_socket(ip);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    })
}

#[test]
fn no_secret_or_password_reaches_logs_metrics_or_errors() {
    if !require_root("secrets e2e") {
        return;
    }
    let ns = NetNs::new("secrets");
    let users = format!(
        "alice\tCleartext-Password := \"{ALICE_PW}\"\nbob\tCleartext-Password := \"{BOB_PW}\"\n"
    );
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], &users, 11812);
    let dir = std::env::temp_dir().join(format!("rs-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nas_file = dir.join("nas.toml");
    std::fs::write(
        &nas_file,
        format!("[[client]]\nprefix = \"127.0.3.1/32\"\nsecret = \"{DYN_SECRET}\"\n"),
    )
    .unwrap();
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = ["127.0.0.1:1812", "127.0.0.1:1813"]
workers = 2
iface = "lo"
ebpf = "require"
metrics = "{METRICS}"
coa_listen = "127.0.0.1:3799"

[[upstream]]
name = "fr"
auth = "127.0.0.1:11812"
acct = "127.0.0.1:11813"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.0.1/32"
name = "eapol"
secret = "{NAS_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"

[dynamic]
prefixes = ["127.0.3.0/24"]
directory = "file"
file = "{}"
"#,
            nas_file.display()
        ),
    )
    .unwrap();
    let mut d = Daemon::start_logging(&ns, None, &["--config", config.to_str().unwrap()], "trace");
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );

    // PAP: accepted, rejected (wrong password), and dropped (signed with another secret).
    let nas = socket(&ns, "127.0.2.9");
    assert!(
        pap(&nas, 1, "alice", ALICE_PW, NAS_SECRET, "secret-nas"),
        "PAP accepted"
    );
    assert!(
        !pap(&nas, 2, "alice", BOB_PW, NAS_SECRET, "secret-nas"),
        "PAP rejected"
    );
    assert!(
        !pap(&nas, 3, "alice", ALICE_PW, UP_SECRET, "secret-nas"),
        "bad signature"
    );

    // EAP: PEAP/MSCHAPv2 with eapol_test.
    let peap = dir.join("peap.conf");
    std::fs::write(
        &peap,
        format!(
            "network={{\n key_mgmt=IEEE8021X\n eap=PEAP\n identity=\"bob\"\n password=\"{BOB_PW}\"\n \
             phase2=\"auth=MSCHAPV2\"\n eapol_flags=0\n}}\n"
        ),
    )
    .unwrap();
    let out = ns
        .command("eapol_test")
        .args([
            "-c",
            peap.to_str().unwrap(),
            "-a",
            "127.0.0.1",
            "-p",
            "1812",
        ])
        .args(["-s", NAS_SECRET, "-t", "10"])
        .output()
        .expect("eapol_test");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SUCCESS"),
        "PEAP through the sidecar"
    );

    // CoA through the NAS's flow; the NAS acknowledges.
    let nas_thread = {
        let nas = nas.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            nas.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let Ok(n) = nas.recv(&mut b) else {
                return false;
            };
            let Ok(p) = Packet::parse(&b[..n]) else {
                return false;
            };
            if p.code() != Code::CoaRequest
                || auth::verify(&p, NAS_SECRET.as_bytes(), None).is_err()
            {
                return false;
            }
            let mut out = [0u8; 64];
            let mut m = PacketMut::new(&mut out, Code::CoaAck, p.identifier()).unwrap();
            m.sign(NAS_SECRET.as_bytes(), Some(p.authenticator()))
                .unwrap();
            nas.send_to(m.as_bytes(), "127.0.0.1:1812").is_ok()
        })
    };
    let coa = spawn_radclient(
        &ns,
        &["-r", "1", "-t", "3", "127.0.0.1:3799", "coa", UP_SECRET],
        "NAS-Identifier = \"secret-nas\"\nUser-Name = \"alice\"\n",
    )
    .wait_with_output()
    .expect("radclient");
    assert!(nas_thread.join().unwrap(), "the NAS got the CoA");
    assert!(
        String::from_utf8_lossy(&coa.stdout).contains("CoA-ACK"),
        "radclient got the CoA-ACK"
    );

    // A dynamic client, defined from the directory file; then the file changes (reload).
    let dyn1 = socket(&ns, "127.0.3.1");
    assert!(
        pap(&dyn1, 1, "alice", ALICE_PW, DYN_SECRET, "dyn-1"),
        "dynamic client"
    );
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime
    std::fs::write(
        &nas_file,
        format!(
            "[[client]]\nprefix = \"127.0.3.1/32\"\nsecret = \"{DYN_SECRET}\"\n\n\
             [[client]]\nprefix = \"127.0.3.2/32\"\nsecret = \"{DYN_SECRET_RELOADED}\"\n"
        ),
    )
    .unwrap();
    let dyn2 = socket(&ns, "127.0.3.2");
    assert!(
        pap(&dyn2, 1, "alice", ALICE_PW, DYN_SECRET_RELOADED, "dyn-2"),
        "a client of the reloaded directory"
    );
    // A broken directory file: the definition fails, with a message.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(
        &nas_file,
        format!("[[client]]\nprefix = \"127.0.3.3/32\"\nsecret = {DYN_SECRET_RELOADED}\n"),
    )
    .unwrap();
    let dyn3 = socket(&ns, "127.0.3.3");
    assert!(!pap(
        &dyn3,
        1,
        "alice",
        ALICE_PW,
        DYN_SECRET_RELOADED,
        "dyn-3"
    ));
    assert!(
        d.wait_for_log("the directory failed", Duration::from_secs(5)),
        "the broken file is reported"
    );

    // Configuration errors, as `check-config` prints them.
    let mut errors = String::new();
    for bad in [
        format!("[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = {UP_SECRET}\n"),
        format!("[[upstream]]\nname = \"a\"\nauth = \"127.0.0.1:1\"\nsecret = \"{UP_SECRET}\n"),
        format!("[[upstream]]\nname = \"a\"\nauth = \"nowhere\"\nsecret = \"{UP_SECRET}\"\n"),
    ] {
        let f = dir.join("bad.toml");
        std::fs::write(&f, bad).unwrap();
        let o = std::process::Command::new(sidecar_bin())
            .args(["check-config", "--config", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!o.status.success());
        errors.push_str(&String::from_utf8_lossy(&o.stderr));
        errors.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    assert!(
        errors.contains("upstream.secret"),
        "errors name the key: {errors}"
    );

    let metrics = metrics_text(&ns, METRICS);
    assert!(
        metrics.contains("radius_relayed_total"),
        "metrics were read"
    );
    d.stop(libc::SIGTERM, Duration::from_secs(10));
    let log = d.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is verbose"
    );
    for said in [
        "dynamic client defined",
        "CoA request sent to the NAS",
        "request not forwarded",
    ] {
        assert!(log.contains(said), "the log covers `{said}`");
    }
    // The check itself sees every form.
    for f in forms(NAS_SECRET) {
        let text = format!("x {f} y");
        assert!(std::panic::catch_unwind(|| assert_no_secret("probe", &text)).is_err());
    }
    assert_no_secret("the log", &log);
    assert_no_secret("the metrics", &metrics);
    assert_no_secret("the configuration errors", &errors);
    let _ = std::fs::remove_dir_all(&dir);
}
