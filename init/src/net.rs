//! The network: loopback, then each configured interface (DHCP, static addresses, IPv6
//! autoconfiguration), the default gateways, and what /etc/resolv.conf will say.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use oci2uk_config::guest::Platform;
use oci2uk_config::{Addr, Family, Interface, Method, Net};

use crate::console::{step, warn};
use crate::dhcp;
use crate::sys::IoctlSocket;

/// What the network setup found out, for /etc.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The first IPv4 address configured (for the host name's line in /etc/hosts).
    pub addr: Option<String>,
    /// Name servers: the configuration's, else DHCP's.
    pub dns: Vec<String>,
    /// Search domains: the configuration's, else DHCP's domain.
    pub search: Vec<String>,
}

/// How long a named interface may take to appear after its driver loaded.
const APPEAR: Duration = Duration::from_secs(2);

/// Sets the network up as `net` says; `None` means DHCP on the first Ethernet interface.
/// Problems are warnings: the application may not need the network.
pub fn setup(net: Option<&Net>, hostname: Option<&str>, platform: Platform) -> Outcome {
    let dhcp_budget = match platform {
        Platform::Xen => {
            wait_for_xen_vifs();
            dhcp::XEN_BUDGET
        }
        Platform::Virtio => dhcp::BUDGET,
    };
    let mut out = Outcome::default();
    let sock = match IoctlSocket::new(libc::AF_INET) {
        Ok(s) => s,
        Err(e) => {
            warn(&format!("no network: cannot open a socket: {e}"));
            return out;
        }
    };
    if let Err(e) = sock.up("lo") {
        warn(&format!("bringing up lo: {e}"));
    }
    step(|| "lo up".into());

    let default_net;
    let net = match net {
        Some(n) => n,
        None => {
            let Some(first) = first_ethernet() else {
                step(|| "no network interface".into());
                return out;
            };
            default_net = Net {
                interfaces: [(
                    first,
                    Interface {
                        addrs: vec![Addr {
                            family: Family::Inet,
                            method: Method::Dhcp,
                            addr: None,
                        }],
                        mtu: None,
                    },
                )]
                .into(),
                ..Net::default()
            };
            &default_net
        }
    };

    let mut routers: Vec<Ipv4Addr> = Vec::new();
    let mut dhcp_dns: Vec<String> = Vec::new();
    let mut dhcp_search: Vec<String> = Vec::new();
    for (name, iface) in &net.interfaces {
        if !wait_for(name) {
            warn(&format!("network interface {name} does not exist"));
            continue;
        }
        if let Err(e) = sock.up(name) {
            warn(&format!("bringing up {name}: {e}"));
            continue;
        }
        if let Some(mtu) = iface.mtu {
            if let Err(e) = sock.set_mtu(name, mtu) {
                warn(&format!("setting the MTU of {name} to {mtu}: {e}"));
            }
        }
        step(|| format!("{name} up"));
        for a in &iface.addrs {
            match (a.family, a.method) {
                (Family::Inet, Method::Dhcp) => {
                    let Some(lease) = run_dhcp(&sock, name, hostname, dhcp_budget) else {
                        continue;
                    };
                    if let Some(ip) = lease.addr {
                        out.addr.get_or_insert_with(|| ip.to_string());
                    }
                    routers.extend(&lease.routers);
                    dhcp_dns.extend(lease.dns.iter().map(|d| d.to_string()));
                    dhcp_search.extend(lease.domain);
                }
                (_, Method::Static) => {
                    let Some((ip, prefix)) = a.cidr() else {
                        continue;
                    };
                    if let Err(e) = set_static(&sock, name, ip, prefix) {
                        warn(&format!("setting {ip}/{prefix} on {name}: {e}"));
                        continue;
                    }
                    if ip.is_ipv4() {
                        out.addr.get_or_insert_with(|| ip.to_string());
                    }
                    step(|| format!("{name}: {ip}/{prefix}"));
                }
                // The kernel autoconfigures IPv6 on an interface that is up.
                _ => {}
            }
        }
    }

    let has_inet_gw = net.gateways.iter().any(|g| g.family == Family::Inet);
    for g in &net.gateways {
        if let Err(e) = add_gateway(&sock, g.addr.parse().ok(), &net.interfaces) {
            warn(&format!("adding the default gateway {}: {e}", g.addr));
        }
    }
    if !has_inet_gw {
        if let Some(r) = routers.first() {
            if let Err(e) = sock.add_default_route(r.octets()) {
                warn(&format!("adding the default route through {r}: {e}"));
            }
        }
    }
    step(|| "routes set".into());

    out.dns = if net.dns.nameservers.is_empty() {
        dhcp_dns
    } else {
        net.dns.nameservers.clone()
    };
    out.search = if net.dns.search.is_empty() {
        dhcp_search
    } else {
        net.dns.search.clone()
    };
    out
}

fn run_dhcp(
    sock: &IoctlSocket,
    name: &str,
    hostname: Option<&str>,
    budget: Duration,
) -> Option<dhcp::Lease> {
    let mac = match sock.hwaddr(name) {
        Ok(m) => m,
        Err(e) => {
            warn(&format!(
                "DHCP on {name}: reading its hardware address: {e}"
            ));
            return None;
        }
    };
    let lease = match dhcp::run(name, mac, hostname, budget) {
        Ok(Some(l)) => l,
        Ok(None) => {
            warn(&format!("DHCP on {name}: no answer"));
            return None;
        }
        Err(e) => {
            warn(&format!("DHCP on {name}: {e}"));
            return None;
        }
    };
    let ip = lease.addr?;
    if let Err(e) = sock.set_inet(name, ip.octets(), lease.prefix) {
        warn(&format!("setting {ip}/{} on {name}: {e}", lease.prefix));
        return None;
    }
    if let Some(mtu) = lease.mtu.filter(|&m| m >= 576) {
        let _ = sock.set_mtu(name, mtu.into());
    }
    step(|| format!("{name}: DHCP gave {ip}/{}", lease.prefix));
    Some(lease)
}

fn set_static(sock: &IoctlSocket, name: &str, ip: IpAddr, prefix: u8) -> std::io::Result<()> {
    match ip {
        IpAddr::V4(v4) => sock.set_inet(name, v4.octets(), prefix),
        IpAddr::V6(v6) => {
            let index = sock.index(name)?;
            IoctlSocket::new(libc::AF_INET6)?.add_inet6(index, v6.octets(), prefix)
        }
    }
}

fn add_gateway(
    sock: &IoctlSocket,
    ip: Option<IpAddr>,
    interfaces: &std::collections::BTreeMap<String, Interface>,
) -> std::io::Result<()> {
    match ip {
        Some(IpAddr::V4(v4)) => sock.add_default_route(v4.octets()),
        Some(IpAddr::V6(v6)) => {
            // An IPv6 route needs its interface: the first one configured for inet6.
            let name = interfaces
                .iter()
                .find(|(_, i)| i.addrs.iter().any(|a| a.family == Family::Inet6))
                .or_else(|| interfaces.iter().next())
                .map(|(n, _)| n.as_str())
                .unwrap_or("eth0");
            let index = sock.index(name)?;
            IoctlSocket::new(libc::AF_INET6)?.add_default_route6(v6.octets(), index)
        }
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an IP address",
        )),
    }
}

/// The first Ethernet interface by name (`eth0` before `eth1`).
fn first_ethernet() -> Option<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            fs::read_to_string(format!("/sys/class/net/{n}/type")).is_ok_and(|t| t.trim() == "1")
        })
        .collect();
    names.sort_by_key(|n| natural_key(n));
    names.into_iter().next()
}

/// `eth10` after `eth9`.
fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_owned(), num.parse().unwrap_or(0))
}

/// How long Xen's network frontends may take to appear: netfront registers an interface only
/// once its backend in dom0 has connected, which takes seconds under nested emulation.
const XEN_APPEAR: Duration = Duration::from_secs(15);

/// Waits (at most [`XEN_APPEAR`]) until every network device the domain was given
/// (`/sys/bus/xen/devices/vif-N`, there from boot) has its interface, so that DHCP and static
/// addresses find it. A domain without one does not wait.
fn wait_for_xen_vifs() {
    let Ok(dir) = fs::read_dir("/sys/bus/xen/devices") else {
        return;
    };
    let vifs: Vec<_> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vif-"))
        .map(|e| e.path())
        .collect();
    if vifs.is_empty() {
        return;
    }
    let has_interface =
        |vif: &Path| fs::read_dir(vif.join("net")).is_ok_and(|mut d| d.next().is_some());
    let deadline = Instant::now() + XEN_APPEAR;
    while !vifs.iter().all(|v| has_interface(v)) {
        if Instant::now() >= deadline {
            for v in vifs.iter().filter(|v| !has_interface(v)) {
                warn(&format!(
                    "the Xen network device {} has no interface after {} s",
                    v.file_name().unwrap_or_default().to_string_lossy(),
                    XEN_APPEAR.as_secs()
                ));
            }
            return;
        }
        sleep(Duration::from_millis(10));
    }
    step(|| format!("{} Xen network interfaces ready", vifs.len()));
}

fn wait_for(name: &str) -> bool {
    let path = Path::new("/sys/class/net").join(name);
    let deadline = Instant::now() + APPEAR;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["eth10", "eth2", "ens3", "eth0"];
        v.sort_by_key(|n| natural_key(n));
        assert_eq!(v, ["ens3", "eth0", "eth2", "eth10"]);
    }
}
