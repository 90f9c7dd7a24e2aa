//! The one place that picks the DNS backend from [dns] update. A new backend (a file beside
//! rfc2136.rs implementing `NodeDns`) is added to `DnsUpdate` and here.

use super::rfc2136::Rfc2136;
use super::{DnsError, NodeDns};
use crate::config::{DnsUpdate, ServerConfig};
use crate::names::HostName;
use crate::process::Deadline;
use std::net::Ipv4Addr;

/// [dns] update = "off": records come from static zone files (`idhal dns zone`) or nowhere,
/// so a node's events change nothing in DNS.
pub struct NoUpdates;

impl NodeDns for NoUpdates {
    fn upsert(&self, _: &HostName, _: Ipv4Addr, _: Deadline) -> Result<bool, DnsError> {
        Ok(false)
    }
    fn remove(&self, _: &HostName, _: Ipv4Addr, _: Deadline) -> Result<bool, DnsError> {
        Ok(false)
    }
    fn is_live(&self) -> bool {
        false
    }
}

/// The backend [dns] update asks for.
pub fn open(cfg: &ServerConfig) -> Box<dyn NodeDns + '_> {
    match cfg.dns.update {
        DnsUpdate::Off => Box::new(NoUpdates),
        DnsUpdate::Rfc2136 => Box::new(Rfc2136 { cfg }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn host() -> HostName {
        let domain = crate::names::Domain::parse("idhal.test").unwrap();
        HostName::parse_in("vnode-7-38.idhal.test", &domain).unwrap()
    }

    #[test]
    fn off_changes_nothing_and_needs_no_key() {
        let cfg = ServerConfig::parse("[dns]\nupdate = \"off\"\n", Path::new("t")).unwrap();
        let dns = open(&cfg);
        let ip = Ipv4Addr::new(10, 134, 7, 38);
        let deadline = Deadline::after(std::time::Duration::from_secs(1));
        assert!(!dns.is_live());
        assert!(!dns.upsert(&host(), ip, deadline).unwrap());
        assert!(!dns.remove(&host(), ip, deadline).unwrap());
    }

    #[test]
    fn rfc2136_without_a_usable_key_is_refused_before_sending() {
        // Config loading refuses this already; the backend does not rely on it.
        let mut cfg = ServerConfig::parse("", Path::new("t")).unwrap();
        cfg.dns.update = DnsUpdate::Rfc2136;
        cfg.dns.server = "127.0.0.1:9".parse().unwrap();
        let dns = open(&cfg);
        assert!(dns.is_live());
        let ip = Ipv4Addr::new(10, 134, 7, 38);
        let deadline = Deadline::after(std::time::Duration::from_secs(1));
        let e = dns.upsert(&host(), ip, deadline).unwrap_err();
        assert!(matches!(e, DnsError::NoKeyFile), "{e:?}");
        assert_eq!(e.to_string(), "[dns] tsig_key_file is not set");
        drop(dns);
        let missing = tempfile::tempdir().unwrap().path().join("missing.key");
        cfg.dns.tsig_key_file = Some(missing.clone());
        let e = open(&cfg).remove(&host(), ip, deadline).unwrap_err();
        assert!(
            matches!(&e, DnsError::KeyFile { path, .. } if *path == missing),
            "{e:?}"
        );
    }
}
