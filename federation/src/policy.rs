//! The locality policy file: Istio's `localityLbSetting` knobs (distribute, failover,
//! failoverPriority) plus an explicit cluster order and outlier detection. Compiled into the
//! `LocalityPolicy` resource the proxies receive. A file with a mistake is rejected with every
//! problem named, and the last good policy keeps serving.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strait_api::pb;

use crate::config::{humantime_ms, parse_yaml};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub locality_lb_setting: LocalityLbSetting,
    /// Clusters in failover order, nearest first (overrides region distance).
    #[serde(default)]
    pub cluster_order: Vec<String>,
    /// Envoy's overprovisioning factor in percent; default 140.
    #[serde(default)]
    pub overprovisioning_percent: Option<u32>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    #[serde(default)]
    pub distribute: Vec<DistributeSpec>,
    #[serde(default)]
    pub failover: Vec<FailoverSpec>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistributeSpec {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailoverSpec {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSpec {
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    /// For example `2s`.
    #[serde(default, with = "opt_duration")]
    #[schemars(with = "Option<String>")]
    pub base_ejection_time: Option<Duration>,
}

mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::humantime_ms::format(d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = <Option<String> as serde::Deserialize>::deserialize(d)?;
        s.map(|s| super::humantime_ms::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Checks the meaning of a parsed policy; returns every problem with its field path.
pub fn validate(p: &PolicyFile) -> Vec<String> {
    let mut errors = vec![];
    let lb = &p.locality_lb_setting;
    if !lb.distribute.is_empty() && !lb.failover.is_empty() {
        errors.push("field `localityLbSetting`: set either `distribute` or `failover`, not both (as in Istio)".into());
    }
    for (i, d) in lb.distribute.iter().enumerate() {
        let sum: u32 = d.to.values().sum();
        if sum != 100 {
            errors.push(format!(
                "field `localityLbSetting.distribute[{i}].to`: weights sum to {sum}; make them sum to 100"
            ));
        }
        if d.from.is_empty() {
            errors.push(format!(
                "field `localityLbSetting.distribute[{i}].from`: give a locality such as us-east/*"
            ));
        }
    }
    for (i, f) in lb.failover.iter().enumerate() {
        if f.from.is_empty() || f.to.is_empty() {
            errors.push(format!(
                "field `localityLbSetting.failover[{i}]`: both `from` and `to` regions are required"
            ));
        } else if f.from == f.to {
            errors.push(format!(
                "field `localityLbSetting.failover[{i}].to`: {:?} fails over to itself; name another region",
                f.to
            ));
        }
    }
    for (i, l) in lb.failover_priority.iter().enumerate() {
        if l.trim().is_empty() {
            errors.push(format!(
                "field `localityLbSetting.failoverPriority[{i}]`: a label name is required"
            ));
        }
    }
    if let Some(o) = p.overprovisioning_percent {
        if !(100..=1000).contains(&o) {
            errors.push(format!(
                "field `overprovisioningPercent`: {o} is outside 100-1000 (Envoy's default is 140)"
            ));
        }
    }
    if let Some(OutlierSpec {
        consecutive_errors: Some(0),
        ..
    }) = &p.outlier_detection
    {
        errors.push("field `outlierDetection.consecutiveErrors`: must be at least 1".into());
    }
    errors
}

/// Loads and checks a policy file.
pub fn load(path: &Path) -> Result<PolicyFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let policy: PolicyFile = parse_yaml(path, &text).map_err(|e| e.to_string())?;
    let errors = validate(&policy);
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(format!("{}: {}", path.display(), errors.join("; ")))
    }
}

/// Compiles a checked policy into the resource proxies receive.
pub fn compile(p: &PolicyFile, source: &str) -> pb::LocalityPolicy {
    pb::LocalityPolicy {
        distribute: p
            .locality_lb_setting
            .distribute
            .iter()
            .map(|d| pb::Distribute {
                from: d.from.clone(),
                to: d.to.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            })
            .collect(),
        failover: p
            .locality_lb_setting
            .failover
            .iter()
            .map(|f| pb::Failover {
                from: f.from.clone(),
                to: f.to.clone(),
            })
            .collect(),
        failover_priority: p.locality_lb_setting.failover_priority.clone(),
        overprovisioning_percent: p.overprovisioning_percent.unwrap_or(140),
        outlier_detection: p.outlier_detection.as_ref().map(|o| pb::OutlierDetection {
            consecutive_errors: o.consecutive_errors.unwrap_or_default(),
            base_ejection_ms: o.base_ejection_time.map(|d| d.as_millis() as u64).unwrap_or_default(),
            max_ejection_percent: 100,
        }),
        cluster_order: p.cluster_order.clone(),
        source: source.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantic_errors_are_all_reported() {
        let p: PolicyFile = serde_yaml::from_str(
            "localityLbSetting:\n  failover: [{from: us-east, to: us-east}]\n  distribute: [{from: 'us-east/*', to: {'us-east/*': 70}}]\n",
        )
        .unwrap();
        let errors = validate(&p);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("not both")));
        assert!(errors.iter().any(|e| e.contains("sum to 70")));
        assert!(errors.iter().any(|e| e.contains("fails over to itself")));
    }

    #[test]
    fn compiles_istio_failover() {
        let p: PolicyFile = serde_yaml::from_str(
            "localityLbSetting:\n  failover:\n  - from: us-east\n    to: eu-central\noutlierDetection:\n  baseEjectionTime: 5s\n",
        )
        .unwrap();
        assert!(validate(&p).is_empty());
        let c = compile(&p, "p.yaml");
        assert_eq!(c.failover[0].to, "eu-central");
        assert_eq!(c.outlier_detection.unwrap().base_ejection_ms, 5000);
    }
}
