//! Where a volume's replicas go. Pure: given the pools with their free bytes
//! and a request, choose one pool in each of `replicas` distinct failure
//! domains. Deterministic, so a retried CreateVolume lands the same way.

use std::collections::BTreeMap;

use crate::core::class::{FailureDomain, Tier};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub pool: String,
    pub node: String,
    pub tier: Tier,
    /// Failure domain for `failureDomain: node`.
    pub domain: String,
    pub zone: String,
    /// Allocatable bytes left (capacity × overcommit − allocated).
    pub free_bytes: u64,
}

impl Candidate {
    fn domain_key(&self, fd: FailureDomain) -> &str {
        match fd {
            FailureDomain::Node => &self.domain,
            FailureDomain::Zone => &self.zone,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub size: u64,
    pub replicas: u8,
    pub tier: Option<Tier>,
    pub failure_domain: FailureDomain,
    /// Data locality: put one replica on this node when it can hold one.
    pub preferred_node: Option<String>,
    /// Domains already holding a replica of this volume (when replacing one).
    pub taken_domains: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error(
        "{replicas} replica(s) need {replicas} distinct {fd} failure domains{tier}, but only {domains} exist{among}"
    )]
    NotEnoughDomains {
        replicas: u8,
        fd: FailureDomain,
        tier: String,
        domains: usize,
        among: String,
    },
    #[error(
        "no room for {replicas} replica(s) of {size} bytes on distinct {fd} failure domains{tier}: {fitting} domain(s) have a pool with that much free space; largest free per domain: {largest}"
    )]
    InsufficientCapacity {
        replicas: u8,
        size: u64,
        fd: FailureDomain,
        tier: String,
        fitting: usize,
        largest: String,
    },
}

fn tier_text(tier: Option<Tier>) -> String {
    tier.map(|t| format!(" in tier {t}")).unwrap_or_default()
}

/// Best pool of each eligible domain (most free bytes, then name), keyed by domain.
fn best_per_domain<'a>(
    req: &Request,
    candidates: &'a [Candidate],
) -> BTreeMap<&'a str, &'a Candidate> {
    let mut best: BTreeMap<&str, &Candidate> = BTreeMap::new();
    for c in candidates {
        if req.tier.is_some_and(|t| t != c.tier) {
            continue;
        }
        let key = c.domain_key(req.failure_domain);
        if req.taken_domains.iter().any(|d| d == key) {
            continue;
        }
        let better = match best.get(key) {
            None => true,
            Some(b) => {
                (c.free_bytes, std::cmp::Reverse(&c.pool))
                    > (b.free_bytes, std::cmp::Reverse(&b.pool))
            }
        };
        if better {
            best.insert(key, c);
        }
    }
    best
}

pub fn choose(req: &Request, candidates: &[Candidate]) -> Result<Vec<Candidate>, PlacementError> {
    let want = usize::from(req.replicas);
    let best = best_per_domain(req, candidates);
    if best.len() < want {
        let among = if best.is_empty() {
            String::new()
        } else {
            format!(" ({})", best.keys().copied().collect::<Vec<_>>().join(", "))
        };
        return Err(PlacementError::NotEnoughDomains {
            replicas: req.replicas,
            fd: req.failure_domain,
            tier: tier_text(req.tier),
            domains: best.len(),
            among,
        });
    }
    let mut fitting: Vec<&Candidate> = best
        .values()
        .copied()
        .filter(|c| c.free_bytes >= req.size)
        .collect();
    if fitting.len() < want {
        let largest = best
            .iter()
            .map(|(d, c)| format!("{d}={}", c.free_bytes))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PlacementError::InsufficientCapacity {
            replicas: req.replicas,
            size: req.size,
            fd: req.failure_domain,
            tier: tier_text(req.tier),
            fitting: fitting.len(),
            largest,
        });
    }
    // Preferred node first, then the emptiest domains, ties by pool name.
    fitting.sort_by(|a, b| {
        let pa = req.preferred_node.as_deref() == Some(a.node.as_str());
        let pb = req.preferred_node.as_deref() == Some(b.node.as_str());
        pb.cmp(&pa)
            .then(b.free_bytes.cmp(&a.free_bytes))
            .then(a.pool.cmp(&b.pool))
    });
    Ok(fitting.into_iter().take(want).cloned().collect())
}

/// The largest volume `choose` could place now for this request (its `size`
/// ignored): the `replicas`-th largest per-domain free space.
pub fn max_volume_size(req: &Request, candidates: &[Candidate]) -> u64 {
    let mut free: Vec<u64> = best_per_domain(req, candidates)
        .values()
        .map(|c| c.free_bytes)
        .collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    let want = usize::from(req.replicas.max(1));
    free.get(want - 1).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn cand(pool: &str, node: &str, tier: Tier, domain: &str, zone: &str, free: u64) -> Candidate {
        Candidate {
            pool: pool.into(),
            node: node.into(),
            tier,
            domain: domain.into(),
            zone: zone.into(),
            free_bytes: free,
        }
    }

    fn req(size: u64, replicas: u8) -> Request {
        Request {
            size,
            replicas,
            tier: None,
            failure_domain: FailureDomain::Node,
            preferred_node: None,
            taken_domains: vec![],
        }
    }

    #[test]
    fn three_replicas_go_to_three_domains_emptiest_first() {
        let pools = vec![
            cand("a1", "n1", Tier::Fast, "n1", "z1", 100),
            cand("a2", "n1", Tier::Fast, "n1", "z1", 200),
            cand("b", "n2", Tier::Fast, "n2", "z1", 50),
            cand("c", "n3", Tier::Fast, "n3", "z2", 70),
            cand("d", "n4", Tier::Fast, "n4", "z2", 10),
        ];
        let got = choose(&req(20, 3), &pools).unwrap();
        let names: Vec<_> = got.iter().map(|c| c.pool.as_str()).collect();
        assert_eq!(names, ["a2", "c", "b"]);
    }

    #[test]
    fn tier_zone_and_locality_are_honoured() {
        let pools = vec![
            cand("f1", "n1", Tier::Fast, "n1", "z1", 100),
            cand("f2", "n2", Tier::Fast, "n2", "z1", 300),
            cand("f3", "n3", Tier::Fast, "n3", "z2", 200),
            cand("s1", "n4", Tier::Slow, "n4", "z3", 900),
        ];
        let mut r = req(10, 2);
        r.tier = Some(Tier::Fast);
        r.failure_domain = FailureDomain::Zone;
        let got = choose(&r, &pools).unwrap();
        assert_eq!(
            got.iter().map(|c| c.pool.as_str()).collect::<Vec<_>>(),
            ["f2", "f3"]
        );
        r.failure_domain = FailureDomain::Node;
        r.preferred_node = Some("n1".into());
        let got = choose(&r, &pools).unwrap();
        assert_eq!(got[0].pool, "f1");
    }

    #[test]
    fn failures_say_what_is_missing() {
        let pools = vec![
            cand("a", "n1", Tier::Fast, "n1", "z", 100),
            cand("b", "n2", Tier::Fast, "n2", "z", 5),
        ];
        let err = choose(&req(10, 3), &pools).unwrap_err();
        assert!(matches!(
            err,
            PlacementError::NotEnoughDomains { domains: 2, .. }
        ));
        assert!(err.to_string().contains("only 2 exist (n1, n2)"), "{err}");
        let err = choose(&req(10, 2), &pools).unwrap_err();
        assert!(matches!(
            err,
            PlacementError::InsufficientCapacity { fitting: 1, .. }
        ));
        assert!(err.to_string().contains("n2=5"), "{err}");
        let mut r = req(1, 1);
        r.tier = Some(Tier::Slow);
        let err = choose(&r, &pools).unwrap_err();
        assert!(err.to_string().contains("in tier slow"), "{err}");
    }

    #[test]
    fn max_volume_size_is_the_kth_largest_domain() {
        let pools = vec![
            cand("a", "n1", Tier::Fast, "n1", "z", 100),
            cand("b", "n2", Tier::Fast, "n2", "z", 50),
            cand("c", "n3", Tier::Fast, "n3", "z", 70),
        ];
        assert_eq!(max_volume_size(&req(0, 1), &pools), 100);
        assert_eq!(max_volume_size(&req(0, 3), &pools), 50);
        assert_eq!(max_volume_size(&req(0, 4), &pools), 0);
    }

    fn arb_pools() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec((0usize..6, 0usize..3, 0usize..3, 0u64..1000), 0..12).prop_map(
            |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (node, zone, tier, free))| {
                        cand(
                            &format!("p{i}"),
                            &format!("n{node}"),
                            Tier::ALL[tier],
                            &format!("n{node}"),
                            &format!("z{zone}"),
                            free,
                        )
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn choice_is_valid_and_exists_exactly_when_possible(
            pools in arb_pools(),
            size in 0u64..1000,
            replicas in 1u8..=5,
            tier in proptest::option::of(0usize..3),
            zone in any::<bool>(),
        ) {
            let mut r = req(size, replicas);
            r.tier = tier.map(|t| Tier::ALL[t]);
            r.failure_domain = if zone { FailureDomain::Zone } else { FailureDomain::Node };
            let key = |c: &Candidate| if zone { c.zone.clone() } else { c.domain.clone() };
            // Reference model: the number of domains with at least one fitting pool.
            let fitting_domains: BTreeSet<String> = pools.iter()
                .filter(|c| r.tier.is_none_or(|t| t == c.tier) && c.free_bytes >= size)
                .map(key)
                .collect();
            match choose(&r, &pools) {
                Ok(got) => {
                    prop_assert_eq!(got.len(), usize::from(replicas));
                    let domains: BTreeSet<String> = got.iter().map(key).collect();
                    prop_assert_eq!(domains.len(), got.len());
                    for c in &got {
                        prop_assert!(c.free_bytes >= size);
                        prop_assert!(r.tier.is_none_or(|t| t == c.tier));
                        prop_assert!(pools.contains(c));
                    }
                    prop_assert!(max_volume_size(&r, &pools) >= size);
                }
                Err(_) => {
                    prop_assert!(fitting_domains.len() < usize::from(replicas));
                }
            }
        }
    }
}
