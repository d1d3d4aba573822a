//! Answers the sidecar makes itself, sans-IO and built with the codec's builders: to a
//! NAS's Status-Server (RFC 5997: never forwarded; answered only with a valid
//! Message-Authenticator, and by the listener's role), the Protocol-Error (RFC 7930) that
//! tells a NAS its request cannot be forwarded instead of leaving it to time out, and what a
//! realm answers here (`realm_answer`: the Access-Reject of a refused realm, with its
//! Reply-Message, and the Accounting-Response of a realm whose accounting stops here).

use crate::{
    codec::{
        Code, Packet, PacketMut, attr,
        auth::{self, SharedSecret},
        edit,
    },
    proxy::Prepared,
};

/// The answer to the Status-Server `request` from a client with `secret`, written in `out`:
/// Access-Accept on an authentication listener, Accounting-Response on an accounting one,
/// both with a Message-Authenticator. `Err` is the reason it is dropped, as counted in
/// `radius_proxy_drops_total`.
pub fn status_server<'a, S: SharedSecret + ?Sized>(
    out: &'a mut [u8],
    request: &[u8],
    secret: &S,
    accounting: bool,
) -> Result<PacketMut<'a>, &'static str> {
    let p = Packet::parse(request).map_err(|_| "malformed")?;
    if p.message_authenticator_offset().is_none() {
        return Err("status_server_without_message_authenticator");
    }
    auth::verify(&p, secret, None).map_err(|_| "bad_signature")?;
    let code = if accounting {
        Code::AccountingResponse
    } else {
        Code::AccessAccept
    };
    let mut m = PacketMut::new(out, code, p.identifier()).map_err(|_| "too_big")?;
    m.message_authenticator_first().map_err(|_| "too_big")?;
    m.sign(secret, Some(p.authenticator()))
        .map_err(|_| "too_big")?;
    Ok(m)
}

/// What a realm answers itself to the `request` of a client with `secret`, written in
/// `out`: an Access-Request gets an Access-Reject (a Message-Authenticator first, then
/// `message` as Reply-Message), an Accounting-Request an Accounting-Response; both echo the
/// request's Proxy-States (RFC 2865 5.33). The request is verified first, and an
/// Access-Request must be signed when its client requires it (`require_signed`): a
/// forged one gets nothing. `Err` is the reason it is dropped.
pub fn realm_answer<'a, S: SharedSecret + ?Sized>(
    out: &'a mut [u8],
    request: &[u8],
    secret: &S,
    require_signed: bool,
    message: Option<&str>,
) -> Result<PacketMut<'a>, &'static str> {
    let p = Packet::parse(request).map_err(|_| "malformed")?;
    auth::verify(&p, secret, None).map_err(|_| "bad_signature")?;
    let code = match p.code() {
        Code::AccessRequest => {
            if require_signed && p.message_authenticator_offset().is_none() {
                return Err("no_message_authenticator");
            }
            Code::AccessReject
        }
        Code::AccountingRequest => Code::AccountingResponse,
        _ => return Err("not_forwarded"),
    };
    let too_big = |_| "too_big";
    let mut m = PacketMut::new(out, code, p.identifier()).map_err(too_big)?;
    if code == Code::AccessReject {
        m.message_authenticator_first().map_err(too_big)?;
        // A Reply-Message is at most 253 bytes; a longer one is cut at a character.
        if let Some(text) = message {
            let mut end = text.len().min(253);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            m.push(attr::REPLY_MESSAGE, &text.as_bytes()[..end])
                .map_err(too_big)?;
        }
    }
    for ps in p.get_all(attr::PROXY_STATE) {
        m.push(attr::PROXY_STATE, ps.value).map_err(too_big)?;
    }
    m.sign(secret, Some(p.authenticator())).map_err(too_big)?;
    Ok(m)
}

/// The Protocol-Error for a request that cannot be forwarded, written in `out`. `prepared`
/// holds the request as already rewritten for the upstream (its first `prepared.len` bytes),
/// so the NAS's Identifier and authenticator come from [`Prepared`], and its Proxy-States are
/// echoed but for ours (`own_proxy_state`).
pub fn protocol_error<'a, S: SharedSecret + ?Sized>(
    out: &'a mut [u8],
    prepared_request: &[u8],
    prepared: &Prepared,
    own_proxy_state: &[u8],
    error_cause: u32,
    secret: &S,
) -> Option<PacketMut<'a>> {
    let req = Packet::parse(prepared_request.get(..prepared.len)?).ok()?;
    edit::protocol_error_to(
        out,
        (prepared.nas_id, &prepared.nas_auth, prepared.code),
        req.get_all(attr::PROXY_STATE)
            .map(|a| a.value)
            .filter(|v| *v != own_proxy_state),
        error_cause,
        secret,
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_realm_gets_a_signed_reject_with_its_message_and_proxy_states() {
        let mut buf = [0u8; 256];
        let mut req = PacketMut::new(&mut buf, Code::AccessRequest, 5).unwrap();
        req.set_authenticator(&[3; 16]);
        req.message_authenticator_first().unwrap();
        req.push(attr::USER_NAME, b"a@refused.example").unwrap();
        req.push(attr::PROXY_STATE, b"upstream-proxy").unwrap();
        req.sign(b"nas", None).unwrap();
        let req = req.as_bytes().to_vec();
        let mut out = [0u8; 512];
        let m = realm_answer(&mut out, &req, b"nas", true, Some("not here")).unwrap();
        let reply = m.view().unwrap();
        assert_eq!(reply.code(), Code::AccessReject);
        assert_eq!(reply.identifier(), 5);
        assert_eq!(reply.get(attr::REPLY_MESSAGE).unwrap().value, b"not here");
        assert_eq!(
            reply.get(attr::PROXY_STATE).unwrap().value,
            b"upstream-proxy"
        );
        auth::verify(&reply, b"nas", Some(&[3; 16])).unwrap();
        // Forged: nothing.
        assert_eq!(
            realm_answer(&mut out, &req, b"other", true, None).err(),
            Some("bad_signature")
        );
    }

    #[test]
    fn status_server_is_answered_by_role_and_only_when_signed() {
        let mut buf = [0u8; 64];
        let req = edit::status_server(&mut buf, 9, b"nas").unwrap();
        let (req, req_auth) = (req.as_bytes().to_vec(), req.authenticator());
        for (accounting, code) in [
            (false, Code::AccessAccept),
            (true, Code::AccountingResponse),
        ] {
            let mut out = [0u8; 64];
            let a = status_server(&mut out, &req, b"nas".as_slice(), accounting).unwrap();
            let p = Packet::parse(a.as_bytes()).unwrap();
            assert_eq!((p.code(), p.identifier()), (code, 9));
            assert!(p.message_authenticator_offset().is_some());
            auth::verify(&p, b"nas".as_slice(), Some(&req_auth)).unwrap();
        }
        let mut out = [0u8; 64];
        assert_eq!(
            status_server(&mut out, &req, b"other".as_slice(), false).err(),
            Some("bad_signature")
        );
        let mut unsigned = [0u8; 64];
        let mut m = PacketMut::new(&mut unsigned, Code::StatusServer, 1).unwrap();
        m.set_authenticator(&auth::random_authenticator());
        let unsigned = m.as_bytes().to_vec();
        assert_eq!(
            status_server(&mut out, &unsigned, b"nas".as_slice(), false).err(),
            Some("status_server_without_message_authenticator")
        );
    }

    #[test]
    fn a_protocol_error_answers_the_nas_request_and_echoes_all_proxy_states_but_ours() {
        // The request as rewritten for the upstream: new Identifier and authenticator, the
        // NAS's Proxy-State, ours after it.
        let mut buf = [0u8; 256];
        let mut m = PacketMut::new(&mut buf, Code::AccountingRequest, 200).unwrap();
        m.push(attr::PROXY_STATE, b"theirs").unwrap();
        m.add_proxy_state(b"ours").unwrap();
        m.sign(b"upstream", None).unwrap();
        let rewritten = m.as_bytes().to_vec();
        let prepared = Prepared {
            nas_v11: false,
            len: rewritten.len(),
            code: Code::AccountingRequest,
            nas_id: 7,
            nas_auth: [3; 16],
            learnt_client_signs: false,
        };
        let mut out = [0u8; 256];
        let e = protocol_error(
            &mut out,
            &rewritten,
            &prepared,
            b"ours",
            405,
            b"nas".as_slice(),
        )
        .unwrap();
        let p = Packet::parse(e.as_bytes()).unwrap();
        assert_eq!((p.code(), p.identifier()), (Code::ProtocolError, 7));
        auth::verify(&p, b"nas".as_slice(), Some(&[3; 16])).unwrap();
        let states: Vec<&[u8]> = p.get_all(attr::PROXY_STATE).map(|a| a.value).collect();
        assert_eq!(states, vec![&b"theirs"[..]]);
        assert_eq!(
            p.get(attr::ERROR_CAUSE).map(|a| a.value),
            Some(&405u32.to_be_bytes()[..])
        );
    }
}
