//! Where an endpoint or a caller is: cluster, region, zone, subzone.

use std::fmt;

use crate::pb;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Locality {
    pub cluster: String,
    pub region: String,
    pub zone: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subzone: String,
}

impl Locality {
    pub fn new(cluster: &str, region: &str, zone: &str) -> Self {
        Locality {
            cluster: cluster.into(),
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        }
    }

    /// The labels Istio's `failoverPriority` understands, derived from the locality.
    pub fn topology_label(&self, key: &str) -> Option<&str> {
        match key {
            "topology.kubernetes.io/region" => Some(&self.region),
            "topology.kubernetes.io/zone" => Some(&self.zone),
            "topology.istio.io/subzone" => Some(&self.subzone),
            "topology.istio.io/cluster" | "strait.dev/cluster" => Some(&self.cluster),
            _ => None,
        }
    }

    /// Whether a `region/zone/subzone` pattern (`*` as wildcard, shorter = prefix) matches.
    pub fn matches(&self, pattern: &str) -> bool {
        let parts = [&self.region, &self.zone, &self.subzone];
        pattern.split('/').zip(parts).all(|(p, v)| p == "*" || p == v)
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.region, self.zone)?;
        if !self.subzone.is_empty() {
            write!(f, "/{}", self.subzone)?;
        }
        Ok(())
    }
}

impl From<&pb::Locality> for Locality {
    fn from(l: &pb::Locality) -> Self {
        Locality {
            cluster: l.cluster.clone(),
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }
    }
}

impl From<&Locality> for pb::Locality {
    fn from(l: &Locality) -> Self {
        pb::Locality {
            cluster: l.cluster.clone(),
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }
    }
}
