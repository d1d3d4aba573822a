//! At debug level the daemon shows each request and answer by its attribute names, from
//! FreeRADIUS's own dictionaries when `server.dictionary` points at them, with hidden
//! values (User-Password, Tunnel-Password) shown as hidden: a real FreeRADIUS answers a
//! PAP request with a Reply-Message and a Tunnel-Password.

use std::time::Duration;

use tests::*;

const NAS_SECRET: &str = "logs-nas-secret";
const UP_SECRET: &str = "logs-upstream-secret";
const FR_PORT: u16 = 15812;

#[test]
fn debug_logs_show_packets_by_name_and_never_a_hidden_value() {
    if !require_root("debug packet logs") {
        return;
    }
    let ns = NetNs::new("logs");
    let dir = std::env::temp_dir().join(format!("rs-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a test folder");
    let users = "alice\tCleartext-Password := \"alice-pw\"\n\tReply-Message = \"hello alice\",\n\
                 \tTunnel-Password = \"tunnel-secret\"\n";
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, FR_PORT);
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 1
dictionary = "/usr/share/freeradius/dictionary"

[[upstream]]
name = "fr"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"
"#
        ),
    )
    .expect("write the configuration");
    let mut d = Daemon::start_logging(
        &ns,
        None,
        &["--config", config.to_str().expect("utf-8")],
        "info,radius_core::engine=debug",
    );
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    assert!(
        ns.run(|| pap_accepted(
            "127.0.2.1",
            ("127.0.0.1", 1812),
            NAS_SECRET,
            Duration::from_secs(3)
        )),
        "{}",
        d.log()
    );
    assert!(d.wait_for_log("to the NAS: Access-Accept", Duration::from_secs(5)));
    let log = d.log();
    let request = log
        .lines()
        .find(|l| l.contains("from the NAS: Access-Request"))
        .expect("the request's line");
    let answer = log
        .lines()
        .find(|l| l.contains("to the NAS: Access-Accept"))
        .expect("the answer's line");
    println!("{request}\n{answer}");
    for (line, part) in [
        (request, "client=\"nases\""),
        (request, "User-Name = \"alice\""),
        (request, "User-Password = <hidden>"),
        (request, "Message-Authenticator = 0x"),
        (answer, "Reply-Message = \"hello alice\""),
        (answer, "Tunnel-Password = <hidden>"),
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    for secret in ["alice-pw", "tunnel-secret", NAS_SECRET, UP_SECRET] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
