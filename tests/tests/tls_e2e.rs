//! End to end, RADIUS/TLS (RFC 6614): radsecproxy 1.9 as a NAS-side RadSec client (radclient
//! sends it UDP, it speaks TLS with a client certificate) to the sidecar's TLS listener, and
//! a real FreeRADIUS on UDP behind the sidecar; and TLS peers with bad certificates (an
//! unknown CA, an expired certificate, none at all) refused at the handshake, counted by
//! reason, while the good one is served. Run as root.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tests::*;

const METRICS: &str = "127.0.0.1:9812";
const UPSTREAM_SECRET: &str = "sidecar-upstream-tls";
/// RFC 6614's shared secret over TLS.
const RADSEC_SECRET: &str = "radsec";
const RADCLIENT_SECRET: &str = "radclient-to-radsecproxy";

const USERS: &str = r#"alice	Cleartext-Password := "alice-pw"
	Reply-Message := "hello alice over tls"

bob	Cleartext-Password := "bob-pw"
"#;

struct Setup {
    topo: Topology,
    _fr: FreeRadius,
    daemon: Daemon,
    pki: PathBuf,
}

fn setup(tag: &str) -> Setup {
    setup_in(tag, false)
}

/// `rotating`: the `[tls]` files are copies in `pki/live` (a test replaces them), and the
/// daemon has a control socket at `pki/control.sock` (to reload).
fn setup_in(tag: &str, rotating: bool) -> Setup {
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-{tag}-{}", std::process::id()));
    write_test_pki(&pki).unwrap();
    let files = if rotating {
        let live = pki.join("live");
        std::fs::create_dir_all(&live).unwrap();
        for f in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(pki.join(f), live.join(f)).unwrap();
        }
        live
    } else {
        pki.clone()
    };
    let control = if rotating {
        format!("control = \"{}\"\n", pki.join("control.sock").display())
    } else {
        String::new()
    };
    let fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let mut daemon = sidecar_with_config(
        &topo.sidecar,
        &format!("tls-{tag}"),
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
listen_tls = ["0.0.0.0:2083"]
tcp_timeout = 2
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"
{control}
[tls]
certificate = "{files}/server.pem"
key = "{files}/server.key"
ca = "{files}/ca.pem"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
acct = "127.0.0.1:11813"
secret = "{UPSTREAM_SECRET}"

# No secret: named by its certificate, it has RFC 6614's "radsec".
[[client]]
prefix = "192.0.2.0/24"
name = "radsec-nas1"
certificate_names = ["nas1"]

# nas2's network: only a certificate named for it will do.
[[client]]
prefix = "198.51.100.0/24"
name = "radsec-nas2"
secret = "{RADSEC_SECRET}"
certificate_names = ["nas2.example.org"]
"#,
            files = files.display()
        ),
    );
    assert!(
        daemon.wait_for_log("max_connections", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    Setup {
        topo,
        _fr: fr,
        daemon,
        pki,
    }
}

/// A running radsecproxy, stopped on drop.
struct Radsecproxy(std::process::Child);

impl Drop for Radsecproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// radsecproxy in `ns` on the configuration `conf` (logging beside it); returns once
/// something listens on `listening` in `ss -lnu` (UDP) or `ss -lnt` (TCP) terms.
fn start_radsecproxy(
    ns: &NetNs,
    pki: &std::path::Path,
    tag: &str,
    conf: &str,
    (flag, listening): (&str, &str),
) -> Radsecproxy {
    let path = pki.join(format!("radsecproxy-{tag}.conf"));
    std::fs::write(
        &path,
        format!(
            "LogLevel 3\nLogDestination file://{}/radsecproxy-{tag}.log\n{conf}",
            pki.display()
        ),
    )
    .unwrap();
    let child = ns
        .command("radsecproxy")
        .args(["-f", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("radsecproxy starts");
    let child = Radsecproxy(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let out = ns.command("ss").arg(flag).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&format!("{listening} ")) {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("radsecproxy does not listen on {listening} after 10 s");
}

/// radsecproxy in `ns`: UDP from radclient on 127.0.0.1:11812, TLS to the sidecar with the
/// client certificate `cert`; returns once it listens.
fn radsecproxy(ns: &NetNs, pki: &std::path::Path, cert: &str) -> Radsecproxy {
    start_radsecproxy(
        ns,
        pki,
        cert,
        &format!(
            "ListenUDP 127.0.0.1:11812\n\
             client radclient {{\n host 127.0.0.1\n type udp\n secret {RADCLIENT_SECRET}\n}}\n\
             tls default {{\n CACertificateFile {dir}/ca.pem\n CertificateFile {dir}/{cert}.pem\n \
             CertificateKeyFile {dir}/{cert}.key\n}}\n\
             server sidecar {{\n host {SIDECAR1_V4}\n port 2083\n type tls\n tls default\n \
             secret {RADSEC_SECRET}\n CertificateNameCheck off\n}}\n\
             realm * {{\n server sidecar\n}}\n",
            dir = pki.display()
        ),
        ("-lnu", "127.0.0.1:11812"),
    )
}

fn radclient(ns: &NetNs, input: &str) -> (bool, String) {
    run_radclient(
        ns,
        &[
            "-x",
            "-r",
            "3",
            "-t",
            "2",
            "127.0.0.1:11812",
            "auth",
            RADCLIENT_SECRET,
        ],
        input,
    )
}

fn closed(ns: &NetNs, reason: &str) -> u64 {
    metric(
        ns,
        METRICS,
        &format!("radius_connections_closed_total{{transport=\"tls\",reason=\"{reason}\"}}"),
    )
}

#[test]
fn radsecproxy_over_tls_is_answered_by_freeradius_on_udp() {
    if !require_root("tls e2e") {
        return;
    }
    let s = setup("good");
    let proxy = radsecproxy(&s.topo.nas1, &s.pki, "nas");
    let (ok, out) = radclient(
        &s.topo.nas1,
        "User-Name = alice, User-Password = alice-pw\n",
    );
    drop(proxy);
    assert!(
        ok && out.contains("Received Access-Accept"),
        "{out}\n{}\n{}",
        std::fs::read_to_string(s.pki.join("radsecproxy-nas.log")).unwrap_or_default(),
        s.daemon.log()
    );
    assert!(out.contains("hello alice over tls"), "{out}");
    assert!(
        metric(
            &s.topo.sidecar,
            METRICS,
            "radius_connections_accepted_total{transport=\"tls\"}"
        ) >= 1
    );
    drop(s.daemon);
}

#[test]
fn bad_certificates_are_refused_at_the_handshake_and_counted() {
    if !require_root("tls e2e") {
        return;
    }
    let s = setup("bad");
    // openssl s_client as a NAS with each bad certificate, and with none; its input stays
    // open a second, so the handshake ends before it says goodbye.
    let attempt = |ns: &NetNs, cert: Option<&str>| {
        let dir = s.pki.display();
        let to = if std::ptr::eq(ns, &s.topo.nas2) {
            SIDECAR2_V4
        } else {
            SIDECAR1_V4
        };
        let with_cert = cert
            .map(|c| format!("-cert {dir}/{c}.pem -key {dir}/{c}.key"))
            .unwrap_or_default();
        let _ = ns
            .command("sh")
            .arg("-c")
            .arg(format!(
                "sleep 1 | timeout 5 openssl s_client -connect {to}:2083 -CAfile {dir}/ca.pem {with_cert}"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
    };
    attempt(&s.topo.nas1, Some("rogue"));
    attempt(&s.topo.nas1, Some("expired"));
    attempt(&s.topo.nas1, None);
    // A good certificate, but not the one nas2's client entry names.
    attempt(&s.topo.nas2, Some("nas"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        closed(&s.topo.sidecar, "unknown_ca") >= 1,
        "{}",
        s.daemon.log()
    );
    assert!(
        closed(&s.topo.sidecar, "expired") >= 1,
        "{}",
        s.daemon.log()
    );
    assert!(
        closed(&s.topo.sidecar, "no_certificate") >= 1,
        "{}",
        s.daemon.log()
    );
    assert!(s.daemon.log().contains("TLS connection refused"));
    // The good NAS is served.
    let proxy = radsecproxy(&s.topo.nas1, &s.pki, "nas");
    let (ok, out) = radclient(
        &s.topo.nas1,
        "User-Name = alice, User-Password = alice-pw\n",
    );
    drop(proxy);
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    drop(s.daemon);
}

#[test]
fn a_reload_puts_rotated_certificates_and_a_new_ca_in_force() {
    if !require_root("tls e2e") {
        return;
    }
    let s = setup_in("rotate", true);
    let ask = |pki: &std::path::Path| {
        let proxy = radsecproxy(&s.topo.nas1, pki, "nas");
        let r = radclient(
            &s.topo.nas1,
            "User-Name = alice, User-Password = alice-pw\n",
        );
        drop(proxy);
        r
    };
    let (ok, out) = ask(&s.pki);
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    // A new CA, and a server certificate from it, written over the files in force.
    let next = s.pki.join("next");
    write_test_pki(&next).unwrap();
    for f in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(next.join(f), s.pki.join("live").join(f)).unwrap();
    }
    let control = s.pki.join("control.sock");
    let (ok, said) = sidecar_cli(
        &s.topo.sidecar,
        &sidecar_bin(),
        &["reload", "--control", control.to_str().unwrap()],
    );
    println!("reload: {said}");
    assert!(ok, "{said}\n{}", s.daemon.log());
    assert!(
        !said.contains("tls"),
        "nothing about tls waits for a restart: {said}"
    );
    let (ok, out) = ask(&next);
    assert!(
        ok && out.contains("Received Access-Accept"),
        "a NAS of the new CA is served over a new connection: {out}\n{}",
        s.daemon.log()
    );
    let (ok, _) = ask(&s.pki);
    assert!(!ok, "a NAS of the old CA no longer is");
    drop(s.daemon);
}

/// The common case of a RadSec sidecar: NASes on UDP, the AAA server over TLS (here
/// radsecproxy 1.9 as the TLS server, FreeRADIUS behind it). The sidecar presents its client
/// certificate and checks the server's; when the server restarts, the sidecar connects
/// again and NASes are answered again.
#[test]
fn udp_nases_are_answered_through_an_upstream_over_tls_across_its_restart() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-up-{}", std::process::id()));
    write_test_pki(&pki).unwrap();
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let home = |tag: &str| {
        start_radsecproxy(
            &topo.sidecar,
            &pki,
            tag,
            &format!(
                "ListenTLS 127.0.0.1:2084\n\
                 tls default {{\n CACertificateFile {dir}/ca.pem\n CertificateFile {dir}/server.pem\n \
                 CertificateKeyFile {dir}/server.key\n}}\n\
                 client sidecar {{\n host 127.0.0.1\n type tls\n tls default\n secret {RADSEC_SECRET}\n \
                 CertificateNameCheck off\n}}\n\
                 server fr {{\n host 127.0.0.1\n port 11812\n type udp\n secret {UPSTREAM_SECRET}\n}}\n\
                 realm * {{\n server fr\n}}\n",
                dir = pki.display()
            ),
            ("-lnt", "127.0.0.1:2084"),
        )
    };
    let first = home("home-1");
    let daemon = sidecar_with_config(
        &topo.sidecar,
        "tls-up",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

[[upstream]]
name = "radsec-home"
auth = "127.0.0.1:2084"
transport = "tls"
secret = "{RADSEC_SECRET}"
tls_ca = "{dir}/ca.pem"
tls_certificate = "{dir}/nas.pem"
tls_key = "{dir}/nas.key"
timeout_ms = 3000

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{RADCLIENT_SECRET}"
"#,
            dir = pki.display()
        ),
    );
    let mut daemon = daemon;
    assert!(
        daemon.wait_for_log("upstream answers Status-Server", Duration::from_secs(5)),
        "the start-up probe goes over TLS too: {}",
        daemon.log()
    );
    let ask = || {
        let child = spawn_radclient(
            &topo.nas1,
            &[
                "-x",
                "-r",
                "4",
                "-t",
                "2",
                &format!("{SIDECAR1_V4}:1812"),
                "auth",
                RADCLIENT_SECRET,
            ],
            "User-Name = alice, User-Password = alice-pw\n",
        );
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = ask();
    assert!(
        out.contains("Received Access-Accept") && out.contains("hello alice over tls"),
        "{out}\n{}\n{}",
        daemon.log(),
        std::fs::read_to_string(pki.join("radsecproxy-home-1.log")).unwrap_or_default()
    );
    assert!(daemon.log().contains("upstream connection open"));
    // The server goes away and comes back: the sidecar connects again.
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let _second = home("home-2");
    let out = ask();
    assert!(
        out.contains("Received Access-Accept"),
        "{out}\n{}",
        daemon.log()
    );
    drop(daemon);
}

/// FreeRADIUS 3.2.1 as a RadSec home server (its `tls` site) behind the sidecar: radclient
/// (PAP) and eapol_test (PEAP/MSCHAPv2, whose MS-MPPE keys eapol_test checks) on UDP to the
/// sidecar, answered over TLS. The keys were hidden by FreeRADIUS with `radsec` and must be
/// re-hidden for the NAS's secret.
#[test]
fn freeradius_as_a_radsec_home_server_answers_udp_nases_pap_and_peap() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-frhome-{}", std::process::id()));
    let (fr, daemon) = behind_freeradius_over_tls(&topo, &pki, "frhome");
    let (ok, out) = run_radclient(
        &topo.nas1,
        &[
            "-x",
            "-r",
            "3",
            "-t",
            "3",
            &format!("{SIDECAR1_V4}:1812"),
            "auth",
            RADCLIENT_SECRET,
        ],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(
        ok && out.contains("Received Access-Accept") && out.contains("hello alice over tls"),
        "{out}\n{}\n{}",
        daemon.log(),
        fr.log()
    );
    let peap = pki.join("peap.conf");
    std::fs::write(
        &peap,
        "network={\n key_mgmt=IEEE8021X\n eap=PEAP\n identity=\"bob\"\n password=\"bob-pw\"\n \
         phase2=\"auth=MSCHAPV2\"\n eapol_flags=0\n}\n",
    )
    .unwrap();
    let out = topo
        .nas1
        .command("eapol_test")
        .args(["-c", peap.to_str().unwrap(), "-a", SIDECAR1_V4])
        .args(["-p", "1812", "-s", RADCLIENT_SECRET, "-t", "10"])
        .output()
        .expect("eapol_test (package eapoltest)");
    let text = String::from_utf8_lossy(&out.stdout);
    // eapol_test compares the MPPE keys it derived with those in the Access-Accept.
    assert!(
        out.status.success()
            && text.contains("SUCCESS")
            && text.contains("MPPE keys OK: 1  mismatch: 0"),
        "{}\n{}",
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
        daemon.log()
    );
    assert!(
        fr.log()
            .contains("-> (127.0.0.1, 2084, virtual-server=default)"),
        "FreeRADIUS answered over its tls site: {}",
        fr.log()
    );
    drop(daemon);
}

/// FreeRADIUS 3.2.1 as a RadSec *client* of the sidecar: radclient sends UDP to a FreeRADIUS
/// proxy in the NAS's network, whose home server (`proto = tcp`, a `tls` block with the
/// NAS's certificate) is the sidecar's TLS listener; the sidecar answers through the
/// FreeRADIUS on UDP behind it.
#[test]
fn freeradius_as_a_radsec_client_is_answered() {
    if !require_root("tls e2e") {
        return;
    }
    let s = setup("frclient");
    let dir = s.pki.display();
    let proxy_conf = format!(
        "proxy server {{\n default_fallback = no\n}}\n\
         home_server sidecar {{\n ipaddr = {SIDECAR1_V4}\n port = 2083\n type = auth\n \
         secret = {RADSEC_SECRET}\n proto = tcp\n status_check = none\n response_window = 5\n \
         tls {{\n  private_key_file = {dir}/nas.key\n  certificate_file = {dir}/nas.pem\n  \
         ca_file = {dir}/ca.pem\n  fragment_size = 8192\n  cipher_list = \"DEFAULT\"\n  \
         connect_timeout = 5\n }}\n}}\n\
         home_server_pool sidecar_pool {{\n type = fail-over\n home_server = sidecar\n}}\n\
         realm sidecar {{\n auth_pool = sidecar_pool\n nostrip\n}}\n"
    );
    let fr_proxy = FreeRadius::start_with(
        &s.topo.nas1,
        &FreeRadiusSetup {
            clients: &[("127.0.0.1", RADCLIENT_SECRET)],
            users: "DEFAULT Proxy-To-Realm := \"sidecar\"\n",
            auth_port: 11812,
            proxy_conf: Some(&proxy_conf),
            ..Default::default()
        },
    );
    let (ok, out) = radclient(
        &s.topo.nas1,
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(
        ok && out.contains("Received Access-Accept") && out.contains("hello alice over tls"),
        "{out}\n{}\n{}",
        s.daemon.log(),
        fr_proxy.log()
    );
    let (_, out) = radclient(&s.topo.nas1, "User-Name = alice, User-Password = wrong\n");
    assert!(out.contains("Received Access-Reject"), "{out}");
    assert!(
        metric(
            &s.topo.sidecar,
            METRICS,
            "radius_connections_accepted_total{transport=\"tls\"}"
        ) >= 1
    );
    drop(s.daemon);
}

/// FreeRADIUS in `ns` with its `tls` site on 127.0.0.1:2084 (certificates of `pki`, the
/// sidecar on 127.0.0.1 its one RadSec client).
fn freeradius_tls_site(ns: &NetNs, pki: &std::path::Path) -> FreeRadius {
    FreeRadius::start_with(
        ns,
        &FreeRadiusSetup {
            clients: &[],
            users: USERS,
            auth_port: 11812,
            tls: Some(FreeRadiusTls {
                port: 2084,
                certificate: &pki.join("server.pem"),
                key: &pki.join("server.key"),
                ca: &pki.join("ca.pem"),
                clients: &["127.0.0.1"],
            }),
            ..Default::default()
        },
    )
}

/// FreeRADIUS with its `tls` site on 127.0.0.1:2084 in the sidecar's namespace, and the
/// sidecar (UDP on 1812 for nas1, secret `RADCLIENT_SECRET`) with it as its TLS upstream;
/// returns once the sidecar's start-up probe was answered over TLS.
fn behind_freeradius_over_tls(
    topo: &Topology,
    pki: &std::path::Path,
    tag: &str,
) -> (FreeRadius, Daemon) {
    write_test_pki(pki).unwrap();
    let fr = freeradius_tls_site(&topo.sidecar, pki);
    let mut daemon = sidecar_with_config(
        &topo.sidecar,
        &format!("tls-{tag}"),
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius-radsec"
auth = "127.0.0.1:2084"
transport = "tls"
secret = "{RADSEC_SECRET}"
tls_ca = "{dir}/ca.pem"
tls_certificate = "{dir}/nas.pem"
tls_key = "{dir}/nas.key"
timeout_ms = 8000

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{RADCLIENT_SECRET}"
"#,
            dir = pki.display()
        ),
    );
    assert!(
        daemon.wait_for_log("upstream answers Status-Server", Duration::from_secs(10)),
        "{}\n{}",
        daemon.log(),
        fr.log()
    );
    // FreeRADIUS 3.2.1 answers no ALPN: RADIUS/TLS, though radius/1.1 was offered.
    assert!(
        daemon.log().contains("upstream TLS connection ready")
            && daemon.log().contains("radius/1.0")
            && !daemon.log().contains("radius/1.1"),
        "{}",
        daemon.log()
    );
    (fr, daemon)
}

/// An upstream TLS connection killed (`ss -K`, as a reset would) three times under load:
/// the requests it carried are sent again on the next connection, with new Identifiers and
/// signatures, and no NAS request is lost.
#[test]
fn requests_on_a_killed_upstream_tls_connection_are_sent_again_none_lost() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-kill-{}", std::process::id()));
    let (fr, daemon) = behind_freeradius_over_tls(&topo, &pki, "kill");
    let spec = tests::loadgen::LoadSpec {
        target: format!("{SIDECAR1_V4}:1812").parse().unwrap(),
        sources: vec![NAS1_V4.parse().unwrap()],
        sockets_per_source: 4,
        outstanding: 64,
        duration: Duration::from_secs(5),
        max_requests: 500_000,
        secret: RADCLIENT_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        // No NAS retransmission: a request not answered in time is lost.
        timeout: Duration::from_secs(3),
        message_authenticator: true,
        rate: None,
    };
    let load = topo.nas1.spawn(move || tests::loadgen::run(&spec).unwrap());
    let mut killed = 0;
    let kills = 3;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(1200));
        let out = topo
            .sidecar
            .command("ss")
            .args(["-K", "-t", "dst", "127.0.0.1", "dport", "=", ":2084"])
            .output()
            .unwrap();
        killed += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("ESTAB"))
            .count();
    }
    let res = load.join().unwrap();
    let resent = metric(
        &topo.sidecar,
        METRICS,
        "radius_upstream_retransmits_total{reason=\"connection_lost\"}",
    );
    println!(
        "killed {killed} connections under load: {} sent, {} answered, {} lost, {} bad, \
         {resent} sent again on a new connection, p99 {:.1} ms",
        res.sent,
        res.answered,
        res.lost,
        res.bad,
        res.latency_ms(0.99)
    );
    assert!(killed >= kills, "ss -K killed {killed} connections");
    assert!(
        res.lost == 0 && res.bad == 0 && res.answered > 1000,
        "{} lost, {} bad\n{}\n{}\n{}",
        res.lost,
        res.bad,
        metrics_text(&topo.sidecar, METRICS)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n"),
        daemon.log(),
        fr.log()
    );
    assert!(
        resent > 0,
        "no request was in flight on a killed connection"
    );
    drop(daemon);
}

/// RADIUS/1.1 (RFC 9765) between two sidecars: radclient (PAP) and eapol_test (PEAP, MPPE
/// keys checked) on UDP to sidecar A, A to sidecar B over TLS with ALPN radius/1.1 (no MD5
/// on that hop: passwords and keys travel plain inside TLS, a Token instead of the
/// authenticator), B to FreeRADIUS on UDP. Both ends say which protocol they agreed on.
/// The same A offers radius/1.1 to FreeRADIUS 3.2.1's tls site, which has no ALPN: there
/// it falls back to RADIUS/TLS (`behind_freeradius_over_tls` asserts it).
#[test]
fn radius_1_1_between_two_sidecars_carries_pap_and_peap() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-v11-{}", std::process::id()));
    write_test_pki(&pki).unwrap();
    let dir = pki.display().to_string();
    let fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let b = sidecar_with_config(
        &topo.sidecar,
        "tls-v11-b",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1912"]
listen_tls = ["127.0.0.1:2085"]
workers = 1
iface = "none"
ebpf = "off"
metrics = "127.0.0.1:9813"

[tls]
certificate = "{dir}/server.pem"
key = "{dir}/server.key"
ca = "{dir}/ca.pem"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "127.0.0.1/32"
name = "sidecar-a"
secret = "{RADSEC_SECRET}"
certificate_names = ["nas1"]
"#
        ),
    );
    let mut a = sidecar_with_config(
        &topo.sidecar,
        "tls-v11-a",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

[[upstream]]
name = "sidecar-b"
auth = "127.0.0.1:2085"
transport = "tls"
secret = "{RADSEC_SECRET}"
tls_ca = "{dir}/ca.pem"
tls_certificate = "{dir}/nas.pem"
tls_key = "{dir}/nas.key"

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{RADCLIENT_SECRET}"
"#
        ),
    );
    assert!(
        a.wait_for_log("upstream answers Status-Server", Duration::from_secs(10)),
        "the start-up probe goes over RADIUS/1.1 too: {}\n{}",
        a.log(),
        b.log()
    );
    let (ok, out) = run_radclient(
        &topo.nas1,
        &[
            "-x",
            "-r",
            "3",
            "-t",
            "3",
            &format!("{SIDECAR1_V4}:1812"),
            "auth",
            RADCLIENT_SECRET,
        ],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(
        ok && out.contains("Received Access-Accept") && out.contains("hello alice over tls"),
        "{out}\n{}\n{}\n{}",
        a.log(),
        b.log(),
        fr.log()
    );
    let (_, out) = run_radclient(
        &topo.nas1,
        &[
            "-x",
            "-r",
            "2",
            "-t",
            "3",
            &format!("{SIDECAR1_V4}:1812"),
            "auth",
            RADCLIENT_SECRET,
        ],
        "User-Name = alice, User-Password = wrong\n",
    );
    assert!(out.contains("Received Access-Reject"), "{out}");
    let peap = pki.join("peap.conf");
    std::fs::write(
        &peap,
        "network={\n key_mgmt=IEEE8021X\n eap=PEAP\n identity=\"bob\"\n password=\"bob-pw\"\n \
         phase2=\"auth=MSCHAPV2\"\n eapol_flags=0\n}\n",
    )
    .unwrap();
    let out = topo
        .nas1
        .command("eapol_test")
        .args(["-c", peap.to_str().unwrap(), "-a", SIDECAR1_V4])
        .args(["-p", "1812", "-s", RADCLIENT_SECRET, "-t", "10"])
        .output()
        .expect("eapol_test (package eapoltest)");
    let text = String::from_utf8_lossy(&out.stdout);
    let counted = |addr: &str| {
        metrics_text(&topo.sidecar, addr)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.ends_with(" 0") && !l.contains("bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        out.status.success()
            && text.contains("SUCCESS")
            && text.contains("MPPE keys OK: 1  mismatch: 0"),
        "{}\nA: {}\nB: {}",
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
        counted(METRICS),
        counted("127.0.0.1:9813"),
    );
    // The negotiated protocol, as each side saw it.
    assert!(
        a.wait_for_log("protocol=\"radius/1.1\"", Duration::from_secs(1))
            || a.log().contains("protocol=radius/1.1"),
        "A: {}",
        a.log()
    );
    assert!(
        b.log().contains("TLS connection accepted") && b.log().contains("radius/1.1"),
        "B: {}",
        b.log()
    );
    assert!(
        !a.log().contains("radius/1.0"),
        "A never fell back: {}",
        a.log()
    );
    drop(a);
    drop(b);
}

/// An upstream that must speak RADIUS/1.1 (`alpn = ["radius/1.1"]`): FreeRADIUS 3.2.1 agrees
/// on no ALPN, so every connection is refused after its handshake, said once per attempt
/// with the reason, and no request goes to it in RADIUS/TLS.
#[test]
fn an_upstream_that_must_speak_radius_1_1_is_refused_when_it_cannot() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-v11req-{}", std::process::id()));
    write_test_pki(&pki).unwrap();
    let fr = freeradius_tls_site(&topo.sidecar, &pki);
    let mut daemon = sidecar_with_config(
        &topo.sidecar,
        "tls-v11req",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius-radsec"
auth = "127.0.0.1:2084"
transport = "tls"
secret = "{RADSEC_SECRET}"
tls_ca = "{dir}/ca.pem"
tls_certificate = "{dir}/nas.pem"
tls_key = "{dir}/nas.key"
alpn = ["radius/1.1"]

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{RADCLIENT_SECRET}"
"#,
            dir = pki.display()
        ),
    );
    assert!(
        daemon.wait_for_log("RADIUS/1.1 required", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("alpn_refused"), "{}", daemon.log());
    assert!(
        metric(
            &topo.sidecar,
            METRICS,
            "radius_upstream_connections_total{upstream=\"freeradius-radsec\",event=\"alpn_refused\"}"
        ) >= 1
    );
    let (_, out) = run_radclient(
        &topo.nas1,
        &[
            "-x",
            "-r",
            "1",
            "-t",
            "2",
            &format!("{SIDECAR1_V4}:1812"),
            "auth",
            RADCLIENT_SECRET,
        ],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(!out.contains("Received Access-Accept"), "{out}");
    assert_eq!(
        metric(&topo.sidecar, METRICS, "radius_relayed_total"),
        0,
        "nothing was answered through it in RADIUS/TLS"
    );
    assert!(
        !daemon.log().contains("upstream answers Status-Server"),
        "nor did the probe pass: {}\n{}",
        daemon.log(),
        fr.log()
    );
    drop(daemon);
}

/// The RFC 3539 watchdog of an upstream connection: FreeRADIUS is frozen (SIGSTOP) with a
/// request out on its TLS connection. After `retry` (2 s) of silence the sidecar sends a
/// Status-Server on the connection; 2 s later, still nothing: it closes the connection and
/// sends the request anew on a new one (within its 8 s timeout), which FreeRADIUS answers
/// once it is resumed.
#[test]
fn a_silent_upstream_connection_is_closed_by_the_watchdog_and_its_request_saved() {
    if !require_root("tls e2e") {
        return;
    }
    let topo = Topology::new();
    let pki = std::env::temp_dir().join(format!("rs-tls-watchdog-{}", std::process::id()));
    let (fr, mut daemon) = behind_freeradius_over_tls(&topo, &pki, "watchdog");
    let pid = fr.child.id().to_string();
    sh(&["kill", "-STOP", &pid]);
    let nas = spawn_radclient(
        &topo.nas1,
        &[
            "-x",
            "-r",
            "1",
            "-t",
            "10",
            &format!("{SIDECAR1_V4}:1812"),
            "auth",
            RADCLIENT_SECRET,
        ],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    let fired = daemon.wait_for_log("closed by the watchdog", Duration::from_secs(7));
    sh(&["kill", "-CONT", &pid]);
    let out = nas.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(fired, "{}", daemon.log());
    assert!(
        out.contains("Received Access-Accept"),
        "{out}\n{}",
        daemon.log()
    );
    assert!(
        metric(
            &topo.sidecar,
            METRICS,
            "radius_upstream_connections_total{upstream=\"freeradius-radsec\",event=\"watchdog\"}"
        ) >= 1
    );
    assert!(
        metric(
            &topo.sidecar,
            METRICS,
            "radius_upstream_retransmits_total{reason=\"connection_lost\"}"
        ) >= 1
    );
    drop(daemon);
}
