//! What the state store knows about a volume: its class, size, replicas and
//! their health. Plain data plus the pure rules about replica state.

use serde::{Deserialize, Serialize};

use crate::core::class::VolumeClass;
use crate::core::extent_list::ExtentList;

/// The most extents a faulted replica's list may hold (see `list_missed`).
const MAX_LISTED: u64 = 4 * crate::core::extent_list::MAX_EXTENTS;

/// Volume sizes are whole mebibytes.
pub const SIZE_UNIT: u64 = 1 << 20;
/// What a request without a size gets.
pub const DEFAULT_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Record written, replicas being created; CreateVolume has not answered yet.
    Creating,
    Ready,
    /// DeleteVolume began; replicas being removed.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ReplicaState {
    /// Holds every acknowledged write.
    Healthy,
    /// Missed writes from `generation` on; must never serve reads again until
    /// rebuilt. `reason` says what failed, for people.
    Faulted {
        generation: u64,
        reason: String,
        /// When it was faulted, seconds since the epoch: the grace period
        /// before replacement counts from here.
        #[serde(default)]
        since: u64,
        /// An empty replacement of a lost replica, being filled in full
        /// (rather than a returning one catching up on what it missed).
        #[serde(default, skip_serializing_if = "is_false")]
        replaced: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The staging path records written before claims carried their purpose
/// used for a repair claim.
const LEGACY_REPAIR_PATH: &str = "(repairing)";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub pool: String,
    pub node: String,
    pub domain: String,
    pub zone: String,
    pub state: ReplicaState,
    /// Bytes copied the last time this replica caught up after a fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_catch_up_bytes: Option<u64>,
    /// What a faulted replica has missed since its fault, for whichever
    /// node catches it up; `None`: not known, so everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<ExtentList>,
}

impl ReplicaRecord {
    pub fn is_healthy(&self) -> bool {
        self.state == ReplicaState::Healthy
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedOn {
    pub node: String,
    pub staging_path: String,
    /// Which claim of the volume this is (`VolumeRecord::claims` when it was
    /// made). Engines act under it, and replica agents refuse writes from
    /// engines of an older claim once a newer one has fenced the replica.
    #[serde(default)]
    pub epoch: u64,
    /// Held by background repair (no staging path, no pod), not by a
    /// NodeStage: a stage meanwhile is told to retry, not to unstage.
    #[serde(default, skip_serializing_if = "is_false")]
    pub repair: bool,
    /// Made by a version whose engines list what faulted replicas miss
    /// (`core::extent_list`): only under such a claim may a list be
    /// trusted, since an engine of an older version may have written under
    /// it before this one restarted under the same claim.
    #[serde(default, skip_serializing_if = "is_false")]
    pub lists_missed: bool,
}

impl StagedOn {
    pub fn is_repair(&self) -> bool {
        self.repair || self.staging_path == LEGACY_REPAIR_PATH
    }

    /// Where the claim stands, for people: the staging path, or what holds it.
    pub fn place(&self) -> &str {
        if self.is_repair() {
            "(repair)"
        } else {
            &self.staging_path
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub capacity_bytes: u64,
    pub class: VolumeClass,
    pub parameters: std::collections::BTreeMap<String, String>,
    pub phase: Phase,
    /// Creation time (ns since the epoch): the order ListVolumes pages in, so
    /// volumes created during a listing appear at its end.
    #[serde(default)]
    pub created_at_ns: u64,
    /// Bumped whenever the set of healthy replicas changes, so a replica's
    /// fault is tied to the moment it stopped receiving writes.
    pub generation: u64,
    pub replicas: Vec<ReplicaRecord>,
    #[serde(default)]
    pub staged_on: Option<StagedOn>,
    /// How many staging claims were ever made: the last claim's epoch.
    #[serde(default)]
    pub claims: u64,
    /// The volume's write log: extents where its engine may have writes in
    /// flight, so the next engine makes the healthy replicas agree there
    /// before serving (`core::extent_list`). `None`: last written by a
    /// version that kept none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writing: Option<ExtentList>,
    /// Target paths this volume is published at (for NodeUnpublish bookkeeping
    /// and LIST_VOLUMES_PUBLISHED_NODES).
    #[serde(default)]
    pub published: Vec<String>,
    /// The claim a provisioned volume belongs to, "namespace/name/uid".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
}

/// Volume ids are derived from the CreateVolume name, so a retried create
/// after a crash finds the record its first attempt wrote.
pub fn volume_id_for(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("tv-{hex}")
}

/// The longest volume id or name a caller may send (the CSI spec asks
/// plugins for no more than 128 bytes).
pub const MAX_ID_BYTES: usize = 128;

/// How much of a rejected caller string an error message repeats.
const SHOWN_BYTES: usize = 64;

/// A caller's string, for an error message: escaped, and cut short so a
/// 4 KiB id does not become a 4 KiB log line.
pub fn shown(value: &str) -> String {
    if value.len() <= SHOWN_BYTES {
        return format!("{value:?}");
    }
    let mut end = SHOWN_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..end], value.len())
}

/// Why `value` (a volume id or name from a caller) can never be valid, if
/// it cannot: empty, too long, or holding anything but ASCII letters,
/// digits, `.`, `_` and `-` (so never a path separator, NUL, `..` or a
/// control character). Ids become file names, so this is what stands
/// between a caller and the file system.
pub fn malformed_reason(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        return Some("it is empty");
    }
    if value.len() > MAX_ID_BYTES {
        return Some("it is longer than 128 bytes");
    }
    if value == "." || value == ".." {
        return Some("it is a path component");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("only ASCII letters, digits, '.', '_' and '-' may appear in it");
    }
    None
}

/// InvalidArgument unless `id` could be some volume's id (see
/// `malformed_reason`); says nothing about whether it exists.
pub fn check_id_well_formed(id: &str) -> crate::core::error::Result<()> {
    use crate::core::error::Error;
    if id.is_empty() {
        return Err(Error::invalid("volume id is required"));
    }
    if let Some(why) = malformed_reason(id) {
        return Err(Error::invalid(format!(
            "volume id {} is malformed: {why}",
            shown(id)
        )));
    }
    Ok(())
}

/// Checks a volume id a caller sent, before anything is looked up or any
/// path is built from it: malformed is `InvalidArgument`; well formed but
/// not an id Terna makes is `NotFound` (no such volume can exist); `Ok`
/// means it has Terna's format and may be looked up.
pub fn check_volume_id(id: &str) -> crate::core::error::Result<()> {
    check_id_well_formed(id)?;
    if !is_valid_volume_id(id) {
        return Err(crate::core::error::Error::not_found(format!(
            "volume {id} does not exist"
        )));
    }
    Ok(())
}

pub fn is_valid_volume_id(id: &str) -> bool {
    id.len() == 27
        && id.starts_with("tv-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// File name of replica `index` of a volume inside its pool.
pub fn replica_file_name(volume_id: &str, index: usize) -> String {
    format!("{volume_id}.r{index}.img")
}

impl VolumeRecord {
    pub fn healthy_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_healthy()).count()
    }

    /// `None` when every replica is healthy, else a sentence for people.
    pub fn degradation(&self) -> Option<String> {
        let faulted: Vec<String> = self
            .replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match &r.state {
                ReplicaState::Healthy => None,
                ReplicaState::Faulted {
                    generation, reason, ..
                } => Some(format!(
                    "replica {i} on pool {} (node {}) faulted at generation {generation}: {reason}",
                    r.pool, r.node
                )),
            })
            .collect();
        if faulted.is_empty() {
            None
        } else {
            Some(format!(
                "degraded: {} of {} replicas healthy; {}",
                self.healthy_count(),
                self.replicas.len(),
                faulted.join("; ")
            ))
        }
    }

    /// Marks replica `index` healthy again after it caught up on `bytes`.
    pub fn heal_replica(&mut self, index: usize, bytes: u64) -> bool {
        let next = self.generation + 1;
        match self.replicas.get_mut(index) {
            Some(r) if !r.is_healthy() => {
                r.state = ReplicaState::Healthy;
                r.last_catch_up_bytes = Some(bytes);
                r.missed = None;
                self.generation = next;
                true
            }
            _ => false,
        }
    }

    /// Claims the volume for `node` at `staging_path`, under a new epoch.
    pub fn claim_staging(&mut self, node: &str, staging_path: &str) {
        self.claims += 1;
        self.staged_on = Some(StagedOn {
            node: node.to_string(),
            staging_path: staging_path.to_string(),
            epoch: self.claims,
            repair: false,
            lists_missed: true,
        });
    }

    /// Claims the volume for background repair on `node`.
    pub fn claim_repair(&mut self, node: &str) {
        self.claims += 1;
        self.staged_on = Some(StagedOn {
            node: node.to_string(),
            staging_path: String::new(),
            epoch: self.claims,
            repair: true,
            lists_missed: true,
        });
    }

    /// A replacement is being filled in full.
    pub fn rebuilding(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| matches!(r.state, ReplicaState::Faulted { replaced: true, .. }))
    }

    /// Claims the volume for `node` at `staging_path` unless another claim
    /// holds it. `dead` is a claim found lapsed: it is taken over only if it
    /// is still the one in place. Returns whether the record changed, and
    /// the claim in the way, if any.
    pub fn try_claim(
        &mut self,
        node: &str,
        staging_path: &str,
        dead: Option<&StagedOn>,
    ) -> (bool, Option<StagedOn>) {
        match self.staged_on.clone() {
            Some(s) if s.node == node && s.staging_path == staging_path => (false, None),
            Some(s) if Some(&s) == dead => {
                self.take_over(&s, node, staging_path);
                (true, None)
            }
            Some(s) => (false, Some(s)),
            None => {
                self.claim_staging(node, staging_path);
                (true, None)
            }
        }
    }

    /// Takes the claim over from `dead`, a node whose lease expired while it
    /// held the volume. Its replicas are faulted: its engine wrote them
    /// directly, up to its end, so they may hold writes the others never
    /// got. They are rebuilt before they serve again.
    pub fn take_over(&mut self, dead: &StagedOn, node: &str, staging_path: &str) {
        let on_dead: Vec<usize> = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.node == dead.node)
            .map(|(i, _)| i)
            .collect();
        let reason = format!(
            "node {} held the volume when its lease expired; taken over by {node}",
            dead.node
        );
        for i in on_dead {
            // The dead holder's own writes in flight may have reached its
            // replica and no other, and its engine may still hold the file
            // open, writing it directly when it resumes: copied in full,
            // into a new file (`FenceEmpty`), never trusted to match.
            if self.fault_replica(i, &reason) {
                self.replicas[i].missed = None;
            }
        }
        self.published.clear();
        self.claim_staging(node, staging_path);
    }

    /// Marks replica `index` faulted. Returns false when it already was, so
    /// the first recorded fault (the earliest missed generation) is kept.
    pub fn fault_replica(&mut self, index: usize, reason: &str) -> bool {
        let next = self.generation + 1;
        let missed = ExtentList::none_yet(self.capacity_bytes, self.claims);
        match self.replicas.get_mut(index) {
            Some(r) if r.is_healthy() => {
                r.state = ReplicaState::Faulted {
                    generation: next,
                    reason: reason.to_string(),
                    since: unix_now(),
                    replaced: false,
                };
                r.missed = Some(missed);
                self.generation = next;
                true
            }
            _ => false,
        }
    }

    /// What replica `index`'s record lists as missed, if it keeps a list.
    pub fn missed_of(&self, index: usize) -> Option<ExtentList> {
        self.replicas.get(index).and_then(|r| r.missed.clone())
    }

    /// Lists `[offset, offset+len)` as missed by faulted replica `index`,
    /// if its record keeps a list; a list grown past `MAX_LISTED` (the
    /// volume expanded since the fault) is dropped: everything is missed.
    /// Whether anything changed.
    pub fn list_missed(&mut self, index: usize, offset: u64, len: u64) -> bool {
        let Some(r) = self.replicas.get_mut(index).filter(|r| !r.is_healthy()) else {
            return false;
        };
        let Some(m) = r.missed.as_mut() else {
            return false;
        };
        let new = m.unlisted(offset, len);
        if !m.list(&new) {
            return false;
        }
        if m.extents.len() as u64 > MAX_LISTED {
            r.missed = None;
        }
        true
    }

    /// Unlists the extents of faulted replica `index` that `map` (its
    /// engine's) has clean: copied whole, and not written since. Whether
    /// anything changed.
    pub fn unlist_copied(&mut self, index: usize, map: &crate::core::dirty::DirtyMap) -> bool {
        match self.replicas.get_mut(index) {
            Some(r) if !r.is_healthy() => r.missed.as_mut().is_some_and(|m| {
                let copied = m.copied(map);
                m.unlist(&copied)
            }),
            _ => false,
        }
    }

    /// An engine starting under `claim` takes the write log over: the
    /// extents it must make agree before serving stay listed (until that
    /// is done), and every extent is listed when a claim since the log was
    /// last kept did not keep it. A volume of one replica keeps none.
    /// Whether anything changed.
    pub fn resume_write_log(&mut self, claim: Option<&StagedOn>) -> bool {
        if self.replicas.len() < 2 {
            // One replica cannot disagree with itself.
            return self.writing.take().is_some();
        }
        let epoch = claim.map_or(0, |c| c.epoch);
        let logging = claim.is_none_or(|c| c.lists_missed);
        let resumed = match &self.writing {
            Some(log) if logging && log.trusted_under(epoch) => ExtentList {
                through_epoch: if epoch == 0 { log.through_epoch } else { epoch },
                ..log.clone()
            }
            .coarsened(self.capacity_bytes),
            Some(_) => ExtentList::everything(self.capacity_bytes, epoch),
            None => ExtentList::none_yet(self.capacity_bytes, epoch),
        };
        let changed = self.writing.as_ref() != Some(&resumed);
        self.writing = Some(resumed);
        changed
    }

    /// Lists `extents` (of `extent_bytes` each, the engine's) in the write
    /// log; whether any was new. A record whose log went missing (rewritten
    /// by an older version) gets one again in the engine's extents.
    pub fn log_writes(&mut self, extent_bytes: u64, extents: &[u64]) -> bool {
        let epoch = self.staged_on.as_ref().map_or(0, |s| s.epoch);
        let log = self.writing.get_or_insert_with(|| ExtentList {
            extent_bytes,
            through_epoch: epoch,
            extents: Default::default(),
        });
        if log.extent_bytes != extent_bytes {
            // Not this engine's log (it resumed another); everything.
            *log = ExtentList {
                extent_bytes,
                through_epoch: epoch,
                extents: (0..self.capacity_bytes.div_ceil(extent_bytes.max(1))).collect(),
            };
            return true;
        }
        log.list(extents)
    }

    /// Unlists `extents` from the write log: no write is in flight there.
    pub fn unlog_writes(&mut self, extents: &[u64]) -> bool {
        self.writing.as_mut().is_some_and(|log| log.unlist(extents))
    }

    /// An engine under claim `epoch` takes over the faulted replicas' lists
    /// it can trust (every claim since each fault kept it) and drops the
    /// others (everything is then missed). Whether anything changed.
    pub fn keep_missed_lists(&mut self, claim: Option<&StagedOn>) -> bool {
        let epoch = claim.map_or(0, |c| c.epoch);
        let listing = claim.is_none_or(|c| c.lists_missed);
        let mut changed = false;
        for r in self.replicas.iter_mut().filter(|r| !r.is_healthy()) {
            match &mut r.missed {
                Some(m) if !listing || !m.trusted_under(epoch) => {
                    r.missed = None;
                    changed = true;
                }
                // Claim 0 never moves; a restart under the same claim
                // changes nothing.
                Some(m) if epoch != 0 && m.through_epoch != epoch => {
                    m.through_epoch = epoch;
                    changed = true;
                }
                _ => {}
            }
        }
        changed
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Bytes rounded up to whole mebibytes.
pub fn round_size(bytes: u64) -> Option<u64> {
    bytes
        .checked_add(SIZE_UNIT - 1)
        .map(|b| b / SIZE_UNIT * SIZE_UNIT)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::class::{FailureDomain, FsType};

    pub(crate) fn record(replicas: usize) -> VolumeRecord {
        VolumeRecord {
            id: volume_id_for("x"),
            name: "x".into(),
            capacity_bytes: SIZE_UNIT,
            class: VolumeClass {
                tier: None,
                replicas: replicas as u8,
                failure_domain: FailureDomain::Node,
                fs_type: FsType::Ext4,
                min_healthy: 1,
            },
            parameters: Default::default(),
            phase: Phase::Ready,
            created_at_ns: 0,
            generation: 1,
            replicas: (0..replicas)
                .map(|i| ReplicaRecord {
                    pool: format!("p{i}"),
                    node: "n".into(),
                    domain: format!("d{i}"),
                    zone: "z".into(),
                    state: ReplicaState::Healthy,
                    last_catch_up_bytes: None,
                    missed: None,
                })
                .collect(),
            staged_on: None,
            claims: 0,
            writing: None,
            published: vec![],
            claim: None,
        }
    }

    #[test]
    fn a_faulted_replicas_list_is_kept_only_along_an_unbroken_chain_of_claims() {
        let mut r = record(3);
        r.capacity_bytes = 64 << 20;
        r.claim_staging("n1", "/s");
        assert!(r.fault_replica(1, "away"));
        assert!(!r.fault_replica(1, "again"), "the first fault is kept");
        let extent = crate::core::extent_list::MIN_EXTENT;
        assert!(r.list_missed(1, 2 * extent, extent + 1));
        assert!(!r.list_missed(1, 3 * extent, 10));
        assert!(!r.list_missed(0, 0, 10), "a healthy replica keeps no list");
        let listed = |r: &VolumeRecord| r.replicas[1].missed.clone().map(|m| m.extents);
        assert_eq!(listed(&r), Some([2, 3].into()));
        let claim = |r: &VolumeRecord| r.staged_on.clone();
        assert!(
            !r.keep_missed_lists(claim(&r).as_ref()),
            "the same claim: nothing to change"
        );
        r.claim_staging("n2", "/s");
        assert!(r.keep_missed_lists(claim(&r).as_ref()));
        assert_eq!(r.replicas[1].missed.as_ref().unwrap().through_epoch, 2);
        // A claim made by an older version (which does not say it lists):
        // its engine may have written unlisted.
        let mut old = r.clone();
        old.staged_on.as_mut().unwrap().lists_missed = false;
        assert!(old.keep_missed_lists(claim(&old).as_ref()));
        assert_eq!(listed(&old), None);
        // Claim 3 goes by with no engine to keep the list.
        r.claim_staging("n3", "/s");
        r.claim_staging("n1", "/s");
        assert!(r.keep_missed_lists(claim(&r).as_ref()));
        assert_eq!(listed(&r), None, "dropped: everything is missed");
        assert!(!r.list_missed(1, 0, 10), "nothing to list into");
        assert!(r.heal_replica(1, 64 << 20));
        assert!(r.replicas[1].missed.is_none());
        // A list past its bound (the volume grew a lot since the fault) is
        // dropped rather than left to outgrow the record.
        let mut grown = record(2);
        grown.capacity_bytes = 64 << 20;
        grown.fault_replica(1, "away");
        grown.capacity_bytes = 1 << 50;
        let step = 2 * extent;
        for n in 0..MAX_LISTED {
            assert!(grown.list_missed(1, n * step, 1));
        }
        assert!(grown.replicas[1].missed.is_some());
        assert!(grown.list_missed(1, MAX_LISTED * step, 1));
        assert!(grown.replicas[1].missed.is_none(), "everything is missed");
    }

    #[test]
    fn a_takeover_faults_the_dead_nodes_replicas_and_claims_under_a_new_epoch() {
        let mut r = record(3);
        r.replicas[0].node = "n1".into();
        r.replicas[1].node = "n2".into();
        r.replicas[2].node = "n3".into();
        r.claim_staging("n1", "/s1");
        r.published = vec!["/p1".into()];
        let dead = r.staged_on.clone().unwrap();
        assert_eq!(dead.epoch, 1);
        let generation = r.generation;
        r.take_over(&dead, "n2", "/s2");
        let claim = r.staged_on.clone().unwrap();
        assert_eq!((claim.node.as_str(), claim.epoch), ("n2", 2));
        assert!(r.published.is_empty());
        assert!(!r.replicas[0].is_healthy());
        assert!(
            r.replicas[0].missed.is_none(),
            "the dead holder's replica may hold its writes in flight: copied in full"
        );
        assert!(r.replicas[1].is_healthy() && r.replicas[2].is_healthy());
        assert_eq!(r.generation, generation + 1);
        // A stale view of the dead claim takes nothing over.
        let held = r.staged_on.clone();
        assert_eq!(r.try_claim("n3", "/s3", Some(&dead)), (false, held.clone()));
        assert_eq!(r.try_claim("n2", "/s2", None), (false, None));
        // Epochs only grow, across unstage and restage too.
        r.staged_on = None;
        r.claim_staging("n3", "/s3");
        assert_eq!(r.staged_on.unwrap().epoch, 3);
    }

    #[test]
    fn a_takeover_resumes_the_dead_holders_write_log_and_rebuilds_its_replicas() {
        let mut r = record(3);
        r.capacity_bytes = 64 << 20;
        for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
            r.replicas[i].node = n.to_string();
        }
        r.claim_staging("n1", "/s1");
        assert!(r.resume_write_log(r.staged_on.clone().as_ref()));
        assert!(r.log_writes(crate::core::extent_list::MIN_EXTENT, &[2, 5]));
        assert!(!r.log_writes(crate::core::extent_list::MIN_EXTENT, &[5]));
        let dead = r.staged_on.clone().unwrap();
        r.take_over(&dead, "n2", "/s2");
        assert!(r.replicas[0].missed.is_none(), "the dead holder's: in full");
        // The log resumes under the new claim, its extents still listed:
        // the taker makes the other replicas agree there before serving.
        let claim = r.staged_on.clone();
        assert!(r.resume_write_log(claim.as_ref()));
        let log = r.writing.clone().unwrap();
        assert_eq!((log.extents, log.through_epoch), ([2, 5].into(), 2));
        assert!(r.unlog_writes(&[2, 5]));
        assert!(!r.unlog_writes(&[2]));
        assert!(
            !r.resume_write_log(claim.as_ref()),
            "a restart changes nothing"
        );
    }

    #[test]
    fn a_write_log_not_kept_by_every_claim_since_lists_everything() {
        let mut r = record(2);
        r.capacity_bytes = 64 << 20;
        r.claim_staging("n1", "/s");
        r.resume_write_log(r.staged_on.clone().as_ref());
        r.log_writes(crate::core::extent_list::MIN_EXTENT, &[1]);
        // Claim 2 goes by with no engine to keep it.
        r.claim_staging("n2", "/s");
        r.claim_staging("n1", "/s");
        r.resume_write_log(r.staged_on.clone().as_ref());
        let log = r.writing.clone().unwrap();
        assert_eq!(log.extents.len(), 8, "64 MiB in 8 MiB extents, all listed");
        // A claim by an older version: its engine kept no log.
        let mut old = record(2);
        old.claim_staging("n1", "/s");
        old.writing = Some(ExtentList::none_yet(SIZE_UNIT, 1));
        old.staged_on.as_mut().unwrap().lists_missed = false;
        old.resume_write_log(old.staged_on.clone().as_ref());
        assert_eq!(old.writing.unwrap().extents.len(), 1);
        // A record from before write logs: nothing is known to be listed.
        let mut legacy = record(2);
        legacy.claim_staging("n1", "/s");
        assert!(legacy.resume_write_log(legacy.staged_on.clone().as_ref()));
        assert!(legacy.writing.unwrap().extents.is_empty());
    }

    #[test]
    fn ids_are_stable_valid_and_distinct() {
        let a = volume_id_for("pvc-1");
        assert_eq!(a, volume_id_for("pvc-1"));
        assert_ne!(a, volume_id_for("pvc-2"));
        assert!(is_valid_volume_id(&a), "{a}");
        assert!(!is_valid_volume_id("tv-../../etc"));
        assert!(!is_valid_volume_id(""));
    }

    #[test]
    fn sizes_round_up_to_mebibytes() {
        assert_eq!(round_size(0), Some(0));
        assert_eq!(round_size(1), Some(SIZE_UNIT));
        assert_eq!(round_size(SIZE_UNIT), Some(SIZE_UNIT));
        assert_eq!(round_size(SIZE_UNIT + 1), Some(2 * SIZE_UNIT));
        assert_eq!(round_size(u64::MAX), None);
    }

    #[test]
    fn first_fault_wins_and_bumps_the_generation() {
        let mut v = record(3);
        assert!(v.degradation().is_none());
        assert!(v.fault_replica(1, "file removed"));
        assert_eq!(v.generation, 2);
        assert!(!v.fault_replica(1, "again"));
        assert_eq!(v.generation, 2);
        assert!(!v.fault_replica(7, "no such replica"));
        let text = v.degradation().unwrap();
        assert!(
            text.contains("2 of 3") && text.contains("pool p1") && text.contains("file removed"),
            "{text}"
        );
    }

    #[test]
    fn hostile_volume_ids_are_invalid_and_never_reach_a_path() {
        use crate::core::error::ErrorKind;
        let long = "a".repeat(4096);
        for id in [
            "",
            "/",
            ".",
            "..",
            "../../etc",
            "/etc/passwd",
            "a/b",
            "tv-\0",
            "a\0b",
            "a b",
            "é",
            "tv-0123456789abcdef01234567\n",
            &long,
        ] {
            let err = check_volume_id(id).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{id:?}: {err}");
            assert!(err.message.len() < 200, "{}", err.message);
        }
    }

    #[test]
    fn well_formed_foreign_ids_are_not_found_and_ours_pass() {
        use crate::core::error::ErrorKind;
        for id in ["fake-vol-id-0123456789", "pvc-1", "TV-ABC", "tv-0123"] {
            assert_eq!(
                check_volume_id(id).unwrap_err().kind,
                ErrorKind::NotFound,
                "{id}"
            );
        }
        check_volume_id(&volume_id_for("pvc-1")).unwrap();
    }

    proptest::proptest! {
        #[test]
        fn an_accepted_id_is_always_one_plain_file_name(id in ".{0,200}") {
            if check_volume_id(&id).is_ok() {
                proptest::prop_assert!(is_valid_volume_id(&id));
                let p = std::path::Path::new("/base").join(&id);
                proptest::prop_assert_eq!(p.parent(), Some(std::path::Path::new("/base")));
                proptest::prop_assert_eq!(p.file_name().and_then(|f| f.to_str()), Some(id.as_str()));
            }
            if malformed_reason(&id).is_none() {
                proptest::prop_assert!(!id.contains('/') && !id.contains('\0') && id != "..");
            }
        }
    }
}
