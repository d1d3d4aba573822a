//! `cargo xtask demo`: the newcomer's tour. A throwaway FreeRADIUS on loopback, the sidecar in
//! front of it, and NASes in network namespaces: one static, one defined at run time by a
//! directory file, and two behind one address with their own secrets. Each sends a few
//! Access-Requests; the tour prints who got what and which path carried it. Root only (it
//! makes namespaces); everything is removed at the end.

use std::{net::UdpSocket, time::Duration};

use radius_sidecar::codec::{Code, Packet, attr, auth};
use tests::*;

const UPSTREAM_SECRET: &str = "demo-upstream";
const METRICS: &str = "127.0.0.1:9812";

struct Nas {
    label: &'static str,
    kind: &'static str,
    ns: fn(&Topology) -> &NetNs,
    ip: &'static str,
    to: &'static str,
    secret: &'static str,
    nas_id: &'static str,
}

fn main() -> anyhow::Result<()> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the demo makes network namespaces: run it as root (`sudo cargo xtask demo`)"
        );
    }
    println!(
        "radius-sidecar demo: building a sidecar host and two NAS hosts (network namespaces)..."
    );
    let topo = Topology::new();
    topo.nas1.ip(&["addr", "add", "192.0.2.3/24", "dev", "nas"]);
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        "alice\tCleartext-Password := \"alice-pw\"\n\tReply-Message := \"welcome, alice\"\n",
        11812,
    );
    println!("  FreeRADIUS (Debian's package) listens on the sidecar host's 127.0.0.1:11812");
    let dir = std::env::temp_dir().join(format!("rs-demo-{}-nas.toml", std::process::id()));
    std::fs::write(
        &dir,
        "[[client]]\nprefix = \"198.51.100.2/32\"\nsecret = \"dynamic-secret\"\nname = \"branch-office\"\n",
    )?;
    let config = format!(
        r#"[server]
listen = ["0.0.0.0:1812"]
workers = 2
iface = "sc1"
ebpf = "auto"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "192.0.2.2/32"
name = "core-switch"
secret = "static-secret"

[[client]]
prefix = "192.0.2.3/32"
nas_identifier = "ap-red"
secret = "red-secret"

[[client]]
prefix = "192.0.2.3/32"
nas_identifier = "ap-blue"
secret = "blue-secret"

[dynamic]
prefixes = ["198.51.100.0/24"]
directory = "file"
file = "{}"
"#,
        dir.display()
    );
    println!("  the sidecar's configuration:\n");
    for l in config.lines() {
        println!("    {l}");
    }
    let d = sidecar_with_config(&topo.sidecar, "demo", &config);
    let path = d
        .log()
        .lines()
        .find(|l| l.contains("fast path"))
        .map(|l| l.split("daemon: ").nth(1).unwrap_or(l).to_owned())
        .unwrap_or_default();
    println!("\n  sidecar: {path}\n");

    let nases = [
        Nas {
            label: "core-switch 192.0.2.2",
            kind: "static client",
            ns: |t| &t.nas1,
            ip: NAS1_V4,
            to: "192.0.2.1:1812",
            secret: "static-secret",
            nas_id: "core-switch",
        },
        Nas {
            label: "branch 198.51.100.2",
            kind: "dynamic (directory file)",
            ns: |t| &t.nas2,
            ip: NAS2_V4,
            to: "198.51.100.1:1812",
            secret: "dynamic-secret",
            nas_id: "branch",
        },
        Nas {
            label: "ap-red 192.0.2.3",
            kind: "behind one NAT address",
            ns: |t| &t.nas1,
            ip: "192.0.2.3",
            to: "192.0.2.1:1812",
            secret: "red-secret",
            nas_id: "ap-red",
        },
        Nas {
            label: "ap-blue 192.0.2.3",
            kind: "behind one NAT address",
            ns: |t| &t.nas1,
            ip: "192.0.2.3",
            to: "192.0.2.1:1812",
            secret: "blue-secret",
            nas_id: "ap-blue",
        },
    ];
    println!(
        "  {:<24} {:<26} {:>4} {:>9}  reply",
        "NAS", "kind", "sent", "accepted"
    );
    for n in &nases {
        let ip = n.ip;
        let sock = (n.ns)(&topo).run(move || {
            let s = UdpSocket::bind((ip, 0)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            s
        });
        let (mut ok, mut message) = (0, String::new());
        for id in 0..3u8 {
            let (p, a) = pap_request(
                id,
                "alice",
                "alice-pw",
                n.secret,
                &[(attr::NAS_IDENTIFIER, n.nas_id.as_bytes())],
            );
            sock.send_to(&p, n.to)?;
            let mut buf = [0u8; 4096];
            if let Ok(len) = sock.recv(&mut buf)
                && let Ok(r) = Packet::parse(&buf[..len])
                && auth::verify(&r, n.secret.as_bytes(), Some(&a)).is_ok()
                && r.code() == Code::AccessAccept
            {
                ok += 1;
                message = r
                    .get(attr::REPLY_MESSAGE)
                    .map(|m| String::from_utf8_lossy(m.value).into_owned())
                    .unwrap_or_default();
            }
        }
        println!(
            "  {:<24} {:<26} {:>4} {:>9}  {message}",
            n.label, n.kind, 3, ok
        );
    }
    let m = |s: &str| metric(&topo.sidecar, METRICS, s);
    std::thread::sleep(Duration::from_millis(1_200));
    println!(
        "\n  flows created: {}, replies relayed: {}, packets steered to a child by eBPF: {}, \
         to a wildcard: {}",
        m("radius_flows_created_total"),
        m("radius_relayed_total"),
        m("radius_fastpath_events_total{event=\"steer_child\"}"),
        m("radius_fastpath_events_total{event=\"steer_listener\"}"),
    );
    println!(
        "  every accepted reply above was verified with that NAS's own secret; FreeRADIUS only \
         knows the sidecar's.\n  cleaning up."
    );
    drop(d);
    let _ = std::fs::remove_file(&dir);
    Ok(())
}
