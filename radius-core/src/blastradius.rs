//! BlastRADIUS (CVE-2024-3596) switches, as FreeRADIUS 3.2.5 has them.

/// A BlastRADIUS (CVE-2024-3596) switch as FreeRADIUS 3.2.5 has them: for upstreams, whether
/// Access replies must carry a Message-Authenticator; for clients, whether Access-Requests
/// must (`require_message_authenticator`) and whether Proxy-State without one is refused
/// (`limit_proxy_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum YesNoAuto {
    Yes,
    No,
    /// Required once the peer has shown that it signs what it need not: a reply (or, for a
    /// client, a request) *without* EAP-Message that carried a valid one. EAP packets must
    /// carry one anyway (RFC 3579), and Status-Server answers too (RFC 5997), so they prove
    /// nothing: Debian 12's FreeRADIUS 3.2.1 signs its EAP replies and not its PAP ones, and
    /// stays "not required".
    #[default]
    Auto,
}
