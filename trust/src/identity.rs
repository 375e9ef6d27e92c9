//! SPIFFE IDs and trust domains, parsed once and carried as types.

use std::fmt;
use std::str::FromStr;

use crate::TrustError;

/// A SPIFFE trust domain such as `mesh.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TrustError::InvalidTrustDomain {
            value: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > 255 {
            return Err(bad("it is longer than 255 characters"));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad("it contains a character other than a-z, 0-9, '.', '-', '_'"));
        }
        Ok(TrustDomain(s.to_string()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`. Strait issues only workload IDs of the form
/// `/ns/<namespace>/sa/<service-account>`, but accepts any valid path from federated domains.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    /// The identity of a Kubernetes-style workload.
    pub fn workload(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Result<Self, TrustError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace of a `/ns/<ns>/sa/<sa>` ID.
    pub fn namespace(&self) -> Option<&str> {
        self.ns_sa().map(|(ns, _)| ns)
    }

    /// The service account of a `/ns/<ns>/sa/<sa>` ID.
    pub fn service_account(&self) -> Option<&str> {
        self.ns_sa().map(|(_, sa)| sa)
    }

    fn ns_sa(&self) -> Option<(&str, &str)> {
        let mut parts = self.path.trim_start_matches('/').split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TrustError::InvalidSpiffeId {
            value: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("the scheme is not spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => return Err(bad("it has no path")),
        };
        let trust_domain: TrustDomain = td.parse().map_err(|_| bad("the trust domain is invalid"))?;
        if path.contains(['?', '#']) {
            return Err(bad("it has a query or fragment"));
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() {
                return Err(bad("it has an empty path segment"));
            }
            if segment == "." || segment == ".." {
                return Err(bad("it has a '.' or '..' path segment"));
            }
            if !segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(bad(
                    "a path segment has a character other than letters, digits, '.', '-', '_'",
                ));
            }
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_string(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_id_round_trips() {
        let id: SpiffeId = "spiffe://mesh.local/ns/demo/sa/echo".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "mesh.local");
        assert_eq!(id.namespace(), Some("demo"));
        assert_eq!(id.service_account(), Some("echo"));
        assert_eq!(id.to_string(), "spiffe://mesh.local/ns/demo/sa/echo");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://mesh.local/ns/a/sa/b",
            "spiffe://mesh.local",
            "spiffe://Mesh.Local/ns/a/sa/b",
            "spiffe://mesh.local//sa/b",
            "spiffe://mesh.local/ns/../sa/b",
            "spiffe://mesh.local/ns/a/sa/b?x=1",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn non_workload_path_has_no_namespace() {
        let id: SpiffeId = "spiffe://mesh.local/gateway/east".parse().unwrap();
        assert_eq!(id.namespace(), None);
    }
}
