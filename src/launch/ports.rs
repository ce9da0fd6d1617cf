//! Ports: an image's exposed port (`80/tcp`, an `ExposedPorts` key) and a forward from a host
//! port to a guest port (`[IP:]HOST:GUEST[/tcp|/udp]`, docker's `-p`). `run -p` and the
//! bundle's QEMU script both forward with [`PortForward`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The protocol a `…/tcp` or `…/udp` suffix names; TCP without one, as docker reads it.
    fn split(s: &str) -> Option<(&str, Proto)> {
        match s.rsplit_once('/') {
            Some((rest, "tcp")) => Some((rest, Proto::Tcp)),
            Some((rest, "udp")) => Some((rest, Proto::Udp)),
            Some(_) => None,
            None => Some((s, Proto::Tcp)),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A guest port: a number and its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    /// The port.
    pub port: u16,
    /// Its protocol.
    pub proto: Proto,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto.name())
    }
}

/// A port that is not `PORT[/tcp|/udp]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port (expected PORT, PORT/tcp or PORT/udp)")]
pub struct BadPort(pub String);

impl FromStr for Port {
    type Err = BadPort;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPort(s.to_string());
        let (port, proto) = match s.split_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (s, Proto::Tcp),
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match port.parse::<u16>() {
            Ok(port) if port != 0 => Ok(Port { port, proto }),
            _ => Err(bad()),
        }
    }
}

/// A forward from a host port to a guest port, `[IP:]HOST:GUEST[/tcp|/udp]` as docker's `-p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForward {
    /// The host address to listen on (all addresses when `None`, as docker does).
    pub host_ip: Option<String>,
    /// The host port.
    pub host: u16,
    /// The guest port and the protocol of both.
    pub guest: Port,
}

impl FromStr for PortForward {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid port forward {s:?}: expected [IP:]HOST:GUEST[/tcp|/udp]");
        let (spec, proto) = Proto::split(s).ok_or_else(bad)?;
        let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        let guest = |p: &str| port(p).map(|port| Port { port, proto });
        match parts.as_slice() {
            [g, host] => Ok(Self {
                host_ip: None,
                host: port(host)?,
                guest: guest(g)?,
            }),
            [g, host, ip] => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                ip.parse::<IpAddr>().map_err(|_| bad())?;
                Ok(Self {
                    host_ip: Some(ip.to_string()),
                    host: port(host)?,
                    guest: guest(g)?,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// The host address the bundle's forwards listen on: only this machine reaches the guest.
pub const LOOPBACK: &str = "127.0.0.1";

/// The forwards for an image's exposed ports, on [`LOOPBACK`]: the guest's port, or
/// `8000 + port` for ports below 1024 (which only root may bind: 80 -> 8080, 443 -> 8443); the
/// next free one when two would collide. Sorted and deduplicated by guest port.
pub fn forwards(ports: &[Port]) -> Vec<PortForward> {
    let mut ports = ports.to_vec();
    ports.sort();
    ports.dedup();
    let mut out: Vec<PortForward> = Vec::new();
    for guest in ports {
        let mut host = if guest.port < 1024 {
            8000 + guest.port
        } else {
            guest.port
        };
        while out
            .iter()
            .any(|f| f.host == host && f.guest.proto == guest.proto)
        {
            host = if host == u16::MAX { 1024 } else { host + 1 };
        }
        out.push(PortForward {
            host_ip: Some(LOOPBACK.to_string()),
            host,
            guest,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forwards() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_ip, p.host, p.guest.port, p.guest.proto.name()),
            (None, 8080, 80, "tcp")
        );
        let p: PortForward = "127.0.0.1:53:5353/udp".parse().unwrap();
        assert_eq!(
            (
                p.host_ip.as_deref(),
                p.host,
                p.guest.port,
                p.guest.proto.name()
            ),
            (Some("127.0.0.1"), 53, 5353, "udp")
        );
        for bad in ["80", "a:80", "0:80", "8080:80/sctp", "1:2:3:4", "70000:80"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_and_their_host_forwards() {
        let p = |s: &str| s.parse::<Port>();
        assert_eq!(
            p("80/tcp").unwrap(),
            Port {
                port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(
            p("8080").unwrap(),
            Port {
                port: 8080,
                proto: Proto::Tcp
            }
        );
        assert_eq!(p("53/udp").unwrap().to_string(), "53/udp");
        for bad in ["", "0", "80/sctp", "+80", "65536", "x/tcp", "80/"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let ports: Vec<Port> = ["8080/tcp", "80/tcp", "80/tcp", "53/udp", "53/tcp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let f: Vec<(u16, String)> = forwards(&ports)
            .iter()
            .map(|f| (f.host, f.guest.to_string()))
            .collect();
        assert_eq!(
            f,
            [
                (8053, "53/tcp".to_string()),
                (8053, "53/udp".to_string()),
                (8080, "80/tcp".to_string()),
                (8081, "8080/tcp".to_string()),
            ]
        );
    }
}
