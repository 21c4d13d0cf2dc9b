//! Storage class parameters: what a volume asks for in speed, redundancy and
//! filesystem. Pure parsing, no I/O; every rejection names the key to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Fast,
    Standard,
    Slow,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Fast, Tier::Standard, Tier::Slow];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Standard => "standard",
            Tier::Slow => "slow",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Tier::ALL.into_iter().find(|t| t.as_str() == s).ok_or(())
    }
}

/// Which pool label must differ between any two replicas of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomain {
    Node,
    Zone,
}

impl fmt::Display for FailureDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureDomain::Node => "node",
            FailureDomain::Zone => "zone",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// The smallest device mkfs accepts for this filesystem.
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 1 << 20,
            FsType::Xfs => 300 << 20,
        }
    }

    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

/// A volume's class, as parsed from StorageClass / CreateVolume parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeClass {
    /// `None`: any tier.
    pub tier: Option<Tier>,
    pub replicas: u8,
    pub failure_domain: FailureDomain,
    pub fs_type: FsType,
    /// Writes are refused (EIO) once fewer replicas than this are healthy.
    pub min_healthy: u8,
}

pub const MAX_REPLICAS: u8 = 5;
pub const DEFAULT_REPLICAS: u8 = 3;

/// Keys Kubernetes sidecars add on their own; they carry no class meaning.
const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

pub const KNOWN_KEYS: [&str; 6] = [
    "tier",
    "replicas",
    "redundancy",
    "failureDomain",
    "fsType",
    "minHealthyReplicas",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error("unknown parameter(s) {}: accepted keys are {}", .0.join(", "), KNOWN_KEYS.join(", "))]
    UnknownKeys(Vec<String>),
    #[error("parameter {key}={value:?} is invalid: {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "parameters replicas={replicas} and redundancy={redundancy} disagree: redundancy {redundancy} means {implied} replica(s); set only one"
    )]
    Conflict {
        replicas: u8,
        redundancy: String,
        implied: u8,
    },
    #[error("parameter minHealthyReplicas={min} exceeds replicas={replicas}")]
    MinHealthyTooHigh { min: u8, replicas: u8 },
}

impl VolumeClass {
    pub fn parse(params: &BTreeMap<String, String>) -> Result<VolumeClass, ClassError> {
        let mut unknown: Vec<String> = params
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()) && !k.starts_with(KUBERNETES_PREFIX))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ClassError::UnknownKeys(unknown));
        }
        let get = |k: &str| params.get(k).map(|v| v.trim());

        let tier = match get("tier") {
            None => None,
            Some(v) => Some(v.parse::<Tier>().map_err(|()| ClassError::BadValue {
                key: "tier",
                value: v.to_string(),
                expected: "one of fast, standard, slow",
            })?),
        };
        let explicit_replicas = match get("replicas") {
            None => None,
            Some(v) => match v.parse::<u8>() {
                Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Some(n),
                _ => {
                    return Err(ClassError::BadValue {
                        key: "replicas",
                        value: v.to_string(),
                        expected: "a whole number from 1 to 5",
                    });
                }
            },
        };
        let redundancy = match get("redundancy") {
            None => None,
            Some(v) => {
                let n = match v {
                    "none" => 1,
                    "standard" => 2,
                    "high" => 3,
                    _ => {
                        return Err(ClassError::BadValue {
                            key: "redundancy",
                            value: v.to_string(),
                            expected: "one of none (1 replica), standard (2), high (3)",
                        });
                    }
                };
                Some((v.to_string(), n))
            }
        };
        let replicas = match (explicit_replicas, redundancy) {
            (Some(r), Some((name, implied))) if r != implied => {
                return Err(ClassError::Conflict {
                    replicas: r,
                    redundancy: name,
                    implied,
                });
            }
            (Some(r), _) => r,
            (None, Some((_, implied))) => implied,
            (None, None) => DEFAULT_REPLICAS,
        };
        let failure_domain = match get("failureDomain") {
            None | Some("node") => FailureDomain::Node,
            Some("zone") => FailureDomain::Zone,
            Some(v) => {
                return Err(ClassError::BadValue {
                    key: "failureDomain",
                    value: v.to_string(),
                    expected: "node or zone",
                });
            }
        };
        let fs_type = match get("fsType") {
            None => FsType::Ext4,
            Some(v) => FsType::parse(v).ok_or_else(|| ClassError::BadValue {
                key: "fsType",
                value: v.to_string(),
                expected: "ext4 or xfs",
            })?,
        };
        let min_healthy = match get("minHealthyReplicas") {
            None => 1,
            Some(v) => match v.parse::<u8>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(ClassError::BadValue {
                        key: "minHealthyReplicas",
                        value: v.to_string(),
                        expected: "a whole number of at least 1",
                    });
                }
            },
        };
        if min_healthy > replicas {
            return Err(ClassError::MinHealthyTooHigh {
                min: min_healthy,
                replicas,
            });
        }
        Ok(VolumeClass {
            tier,
            replicas,
            failure_domain,
            fs_type,
            min_healthy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_parameters_give_the_documented_defaults() {
        let c = VolumeClass::parse(&BTreeMap::new()).unwrap();
        assert_eq!(
            c,
            VolumeClass {
                tier: None,
                replicas: 3,
                failure_domain: FailureDomain::Node,
                fs_type: FsType::Ext4,
                min_healthy: 1
            }
        );
    }

    #[test]
    fn every_parameter_is_read() {
        let c = VolumeClass::parse(&params(&[
            ("tier", "fast"),
            ("replicas", "5"),
            ("failureDomain", "zone"),
            ("fsType", "xfs"),
            ("minHealthyReplicas", "2"),
        ]))
        .unwrap();
        assert_eq!(c.tier, Some(Tier::Fast));
        assert_eq!(c.replicas, 5);
        assert_eq!(c.failure_domain, FailureDomain::Zone);
        assert_eq!(c.fs_type, FsType::Xfs);
        assert_eq!(c.min_healthy, 2);
    }

    #[test]
    fn redundancy_names_map_to_replica_counts() {
        for (name, n) in [("none", 1), ("standard", 2), ("high", 3)] {
            let c = VolumeClass::parse(&params(&[("redundancy", name)])).unwrap();
            assert_eq!(c.replicas, n);
            let c = VolumeClass::parse(&params(&[
                ("redundancy", name),
                ("replicas", &n.to_string()),
            ]))
            .unwrap();
            assert_eq!(c.replicas, n);
        }
        let err =
            VolumeClass::parse(&params(&[("redundancy", "none"), ("replicas", "3")])).unwrap_err();
        assert!(err.to_string().contains("disagree"), "{err}");
    }

    #[test]
    fn unknown_keys_are_all_named_and_kubernetes_keys_pass() {
        let err = VolumeClass::parse(&params(&[("zz", "1"), ("speed", "x"), ("tier", "fast")]))
            .unwrap_err();
        assert_eq!(
            err,
            ClassError::UnknownKeys(vec!["speed".into(), "zz".into()])
        );
        assert!(err.to_string().contains("speed, zz"));
        VolumeClass::parse(&params(&[("csi.storage.k8s.io/pvc/name", "data")])).unwrap();
    }

    #[test]
    fn bad_values_name_key_value_and_what_is_expected() {
        for (k, v) in [
            ("tier", "blazing"),
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "three"),
            ("redundancy", "max"),
            ("failureDomain", "rack"),
            ("fsType", "btrfs"),
            ("minHealthyReplicas", "0"),
        ] {
            let err = VolumeClass::parse(&params(&[(k, v)])).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(k) && text.contains(v), "{text}");
        }
        let err = VolumeClass::parse(&params(&[("replicas", "2"), ("minHealthyReplicas", "3")]))
            .unwrap_err();
        assert_eq!(
            err,
            ClassError::MinHealthyTooHigh {
                min: 3,
                replicas: 2
            }
        );
    }

    proptest! {
        #[test]
        fn any_replica_count_parses_iff_in_range(n in 0u32..300) {
            let r = VolumeClass::parse(&params(&[("replicas", &n.to_string())]));
            prop_assert_eq!(r.is_ok(), (1..=5).contains(&n));
            if let Ok(c) = r { prop_assert_eq!(u32::from(c.replicas), n); }
        }

        #[test]
        fn arbitrary_maps_never_panic_and_unknown_keys_always_fail(
            m in proptest::collection::btree_map("[a-zA-Z/.]{1,12}", "[a-z0-9]{0,6}", 0..6)
        ) {
            let has_unknown = m.keys().any(|k| !KNOWN_KEYS.contains(&k.as_str()) && !k.starts_with(KUBERNETES_PREFIX));
            let r = VolumeClass::parse(&m);
            if has_unknown {
                prop_assert!(matches!(r, Err(ClassError::UnknownKeys(_))));
            }
        }
    }
}
