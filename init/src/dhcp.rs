//! A minimal DHCPv4 client (RFC 2131): DISCOVER, OFFER, REQUEST, ACK, over a UDP socket bound
//! to the interface, asking the server to broadcast its answers (the interface has no address
//! yet, so the kernel would drop unicast ones). Short and bounded: QEMU's user network answers
//! at once, and a guest without a DHCP server must not hang.
//!
//! The lease is not renewed: the address stays configured for the life of the guest.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::sys;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// How soon a request is sent again when no answer came; each retry waits twice as long as
/// the one before, up to [`MAX_RETRY`]. A server that is slow to answer (one busy in a loaded
/// dom0, or probing an address with ARP first) gets fewer duplicates to work through.
const RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two sends.
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How long the whole exchange may take where the server answers at once (QEMU's user
/// network, a host's dnsmasq).
pub const BUDGET: Duration = Duration::from_secs(4);
/// The same on Xen, where the server sits on dom0's bridge: the guest's port joins the bridge
/// only when dom0's hotplug script has run, which can take seconds after the interface came
/// up, and a server may probe an address (busybox udhcpd: ARP, up to 2 s) before offering it.
/// Under nested emulation a loaded dom0 has taken longer than 20 s to answer: a guest without
/// its address serves nothing, so it waits up to a minute.
pub const XEN_BUDGET: Duration = Duration::from_secs(60);

/// What the server gave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lease {
    /// Our address.
    pub addr: Option<Ipv4Addr>,
    /// Prefix length (from the subnet mask; 24 when the server sends none).
    pub prefix: u8,
    /// Default routers.
    pub routers: Vec<Ipv4Addr>,
    /// Name servers.
    pub dns: Vec<Ipv4Addr>,
    /// The domain name, used as the search domain.
    pub domain: Option<String>,
    /// The MTU.
    pub mtu: Option<u16>,
    /// Lease time in seconds.
    pub lease_secs: Option<u32>,
    /// The server's identifier.
    pub server: Option<Ipv4Addr>,
}

/// A reply: its message type, transaction id and lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The DHCP message type (2 OFFER, 5 ACK, 6 NAK).
    pub kind: u8,
    /// The transaction id.
    pub xid: u32,
    /// What the reply offers.
    pub lease: Lease,
}

/// Builds a client message: DISCOVER, or REQUEST for `requested` from `server`.
pub fn build(
    kind: u8,
    xid: u32,
    mac: [u8; 6],
    requested: Option<(Ipv4Addr, Ipv4Addr)>,
    hostname: Option<&str>,
) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6; // hardware address length
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10] = 0x80; // broadcast flag: answer to the broadcast address
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, kind]);
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    option(&mut p, 61, &client_id);
    if let Some((addr, server)) = requested {
        option(&mut p, 50, &addr.octets());
        option(&mut p, 54, &server.octets());
    }
    if let Some(h) = hostname {
        if !h.is_empty() && h.len() < 256 {
            option(&mut p, 12, h.as_bytes());
        }
    }
    // Subnet mask, router, DNS, domain name, MTU, broadcast, lease time, server id.
    option(&mut p, 55, &[1, 3, 6, 15, 26, 28, 51, 54]);
    option(&mut p, 57, &1500u16.to_be_bytes());
    p.push(255);
    // BOOTP's minimum message size; some servers drop shorter ones.
    if p.len() < 300 {
        p.resize(300, 0);
    }
    p
}

fn option(p: &mut Vec<u8>, code: u8, data: &[u8]) {
    p.push(code);
    p.push(data.len() as u8);
    p.extend_from_slice(data);
}

/// Parses a server's reply meant for `mac`; `None` for anything else.
pub fn parse(p: &[u8], mac: [u8; 6]) -> Option<Reply> {
    if p.len() < 240 || p[0] != 2 || p[236..240] != MAGIC || p[28..34] != mac {
        return None;
    }
    let xid = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let yiaddr = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let mut lease = Lease {
        addr: (!yiaddr.is_unspecified()).then_some(yiaddr),
        prefix: 24,
        ..Lease::default()
    };
    let mut kind = None;
    let mut i = 240;
    while i < p.len() {
        let code = p[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 || i + 1 >= p.len() {
            break;
        }
        let len = p[i + 1] as usize;
        let data = p.get(i + 2..i + 2 + len)?;
        let ip = |d: &[u8]| Ipv4Addr::new(d[0], d[1], d[2], d[3]);
        let ips = |d: &[u8]| d.chunks_exact(4).map(ip).collect::<Vec<_>>();
        match code {
            53 if len == 1 => kind = Some(data[0]),
            1 if len == 4 => {
                let mask = u32::from_be_bytes(data.try_into().ok()?);
                lease.prefix = mask.leading_ones() as u8;
            }
            3 => lease.routers = ips(data),
            6 => lease.dns = ips(data),
            15 => {
                let d = String::from_utf8_lossy(data);
                let d = d.trim_end_matches('\0').trim();
                lease.domain = (!d.is_empty()).then(|| d.to_owned());
            }
            26 if len == 2 => lease.mtu = Some(u16::from_be_bytes([data[0], data[1]])),
            51 if len == 4 => lease.lease_secs = Some(u32::from_be_bytes(data.try_into().ok()?)),
            54 if len == 4 => lease.server = Some(ip(data)),
            _ => {}
        }
        i += 2 + len;
    }
    Some(Reply {
        kind: kind?,
        xid,
        lease,
    })
}

/// Runs the exchange on `ifname` (which must be up). `None` when no server answered in time.
pub fn run(
    ifname: &str,
    mac: [u8; 6],
    hostname: Option<&str>,
    budget: Duration,
) -> std::io::Result<Option<Lease>> {
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    sys::bind_to_device(&sock, ifname)?;
    sock.set_broadcast(true)?;
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let deadline = Instant::now() + budget;
    let xid = sys::random_u32();

    let discover = build(DISCOVER, xid, mac, None, hostname);
    let Some(offer) = exchange(&sock, &to, &discover, xid, mac, &[OFFER], deadline)? else {
        return Ok(None);
    };
    let (Some(addr), server) = (offer.lease.addr, offer.lease.server) else {
        return Ok(None);
    };
    let server = server.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let request = build(REQUEST, xid, mac, Some((addr, server)), hostname);
    match exchange(&sock, &to, &request, xid, mac, &[ACK, NAK], deadline)? {
        Some(Reply {
            kind: ACK, lease, ..
        }) => {
            let mut lease = lease;
            lease.addr = lease.addr.or(Some(addr));
            Ok(Some(lease))
        }
        _ => Ok(None),
    }
}

fn exchange(
    sock: &UdpSocket,
    to: &SocketAddrV4,
    msg: &[u8],
    xid: u32,
    mac: [u8; 6],
    want: &[u8],
    deadline: Instant,
) -> std::io::Result<Option<Reply>> {
    let mut buf = [0u8; 1500];
    let mut wait = RETRY;
    while Instant::now() < deadline {
        sock.send_to(msg, to)?;
        let resend = (Instant::now() + wait).min(deadline);
        wait = (wait * 2).min(MAX_RETRY);
        loop {
            let now = Instant::now();
            if now >= resend {
                break;
            }
            sock.set_read_timeout(Some(resend - now))?;
            let n = match sock.recv_from(&mut buf) {
                Ok((n, _)) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(r) = parse(&buf[..n], mac) {
                if r.xid == xid && want.contains(&r.kind) {
                    return Ok(Some(r));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A server's reply, as QEMU's user network builds one.
    fn reply(kind: u8, xid: u32) -> Vec<u8> {
        let mut p = vec![0u8; 236];
        p[0] = 2;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p[20..24].copy_from_slice(&[10, 0, 2, 2]);
        p[28..34].copy_from_slice(&MAC);
        p.extend_from_slice(&MAGIC);
        p.extend_from_slice(&[53, 1, kind]);
        p.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[51, 4, 0, 1, 0x51, 0x80]);
        p.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        p.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[6, 8, 10, 0, 2, 3, 1, 1, 1, 1]);
        p.extend_from_slice(&[0, 0]); // padding
        p.extend_from_slice(&[15, 12]);
        p.extend_from_slice(b"example.org\0");
        p.extend_from_slice(&[26, 2, 0x05, 0xdc]);
        p.push(255);
        p
    }

    #[test]
    fn builds_discover_and_request() {
        let d = build(DISCOVER, 0xdeadbeef, MAC, None, Some("web"));
        assert_eq!(d.len(), 300);
        assert_eq!(&d[..4], &[1, 1, 6, 0]);
        assert_eq!(&d[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(d[10], 0x80);
        assert_eq!(&d[28..34], &MAC);
        assert_eq!(&d[236..243], &[99, 130, 83, 99, 53, 1, 1]);
        assert_eq!(&d[243..251], &[61, 7, 1, 0x52, 0x54, 0, 0x12, 0x34]);
        let opts = &d[240..];
        assert!(opts.windows(5).any(|w| w == [12, 3, b'w', b'e', b'b']));

        let r = build(
            REQUEST,
            1,
            MAC,
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
            None,
        );
        let opts = &r[240..];
        assert_eq!(&opts[..3], &[53, 1, 3]);
        assert!(opts.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
    }

    #[test]
    fn parses_a_reply() {
        let r = parse(&reply(ACK, 7), MAC).unwrap();
        assert_eq!(r.kind, ACK);
        assert_eq!(r.xid, 7);
        let l = r.lease;
        assert_eq!(l.addr, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.routers, [Ipv4Addr::new(10, 0, 2, 2)]);
        assert_eq!(
            l.dns,
            [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(l.domain.as_deref(), Some("example.org"));
        assert_eq!(l.mtu, Some(1500));
        assert_eq!(l.lease_secs, Some(86400));
        assert_eq!(l.server, Some(Ipv4Addr::new(10, 0, 2, 2)));
    }

    #[test]
    fn ignores_what_is_not_for_us() {
        let mut other = reply(OFFER, 7);
        other[33] ^= 1;
        assert_eq!(parse(&other, MAC), None);
        let mut request = reply(OFFER, 7);
        request[0] = 1;
        assert_eq!(parse(&request, MAC), None);
        assert_eq!(parse(&reply(OFFER, 7)[..239], MAC), None);
        // An option running past the end.
        let mut cut = reply(OFFER, 7);
        cut.truncate(cut.len() - 2);
        assert_eq!(parse(&cut, MAC), None);
        // No message type: BOOTP, not DHCP.
        let mut bootp = reply(OFFER, 7);
        bootp[240] = 0;
        bootp[241] = 0;
        bootp[242] = 0;
        assert_eq!(parse(&bootp, MAC), None);
    }

    #[test]
    fn own_messages_parse_back_as_requests_only() {
        let d = build(DISCOVER, 1, MAC, None, None);
        assert_eq!(parse(&d, MAC), None);
    }
}
