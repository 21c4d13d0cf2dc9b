//! The cluster CA as data: making a CA, issuing leaf certificates from it,
//! and the rotation that replaces it without a flag day. No I/O: the file
//! and the Secret that hold a `CaSet` are elsewhere.
//!
//! Rotation is three steps, each published to every process before the
//! next is taken (`Schedule::dwell` apart):
//!
//! 1. **Stage**: a new CA is made and trusted (`next`), but signs nothing,
//!    so every peer trusts it before any certificate from it is shown.
//! 2. **Promote**: the new CA signs (`current`); the old one stays trusted
//!    (`previous`), since peers that have not renewed yet still show leaves
//!    it signed. Every process renews its leaf from the new CA when it sees
//!    the change.
//! 3. **Retire**: the old CA is trusted no more.
//!
//! Connections made under an old certificate are not cut at any step: a
//! TLS session is checked once, at its handshake, and lives until the
//! connection is recycled.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::TlsError;

/// Every Terna identity's certificate names `<identity>.node.terna`: a
/// name no public CA issues and no real host has.
pub const NODE_DOMAIN: &str = "node.terna";
/// How long a node's leaf certificate is valid; renewed at half of it.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a CA is valid; the schedule stages its successor at two thirds.
pub const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before they are made, so a peer whose clock
/// is a little behind still takes them.
const BACKDATE_SECS: i64 = 300;

/// A CA that signs or will sign: its certificate and private key (PEM).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaPair {
    /// The CA's subject common name, unique per CA: leaves name it as
    /// their issuer.
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Unix seconds.
    pub created: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for CaPair {
    // Never the key, wherever a CaSet is logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPair")
            .field("name", &self.name)
            .field("created", &self.created)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A CA trusted but no longer signing: its certificate only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiringCa {
    pub name: String,
    pub cert_pem: String,
}

/// The cluster's CAs: the one that signs, and during a rotation the one
/// staged to sign next or the one that signed before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaSet {
    pub current: CaPair,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<CaPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<RetiringCa>,
    /// When the last rotation step (or the creation) happened, unix seconds.
    pub changed: i64,
}

/// One rotation step (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Stage,
    Promote,
    Retire,
}

/// When rotation steps are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Lifetime of the CAs the rotation makes.
    pub ca_lifetime: Duration,
    /// Least time between two steps: long enough for every process to
    /// have seen the previous one.
    pub dwell: Duration,
}

impl Default for Schedule {
    fn default() -> Schedule {
        Schedule {
            ca_lifetime: CA_LIFETIME,
            dwell: Duration::from_secs(3600),
        }
    }
}

/// A leaf certificate and its key (DER), for one identity.
pub struct Leaf {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    /// Unix seconds.
    pub not_after: i64,
}

/// The DNS name `identity`'s certificate carries.
pub fn dns_name(identity: &str) -> Result<String, TlsError> {
    let name = format!("{}.{NODE_DOMAIN}", identity.to_ascii_lowercase());
    rustls::pki_types::DnsName::try_from(name.as_str())
        .map_err(|_| TlsError::BadIdentity(identity.to_string()))?;
    Ok(name)
}

fn datetime(unix: i64) -> Result<OffsetDateTime, TlsError> {
    OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| TlsError::Time(format!("{unix} is not a time: {e}")))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| TlsError::Random(e.to_string()))?;
    // Positive, as DER integers of serials must be.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// What a CA's certificate says, rebuilt identically to sign with it (the
/// issuer of a leaf is the CA's subject).
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Terna");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A new CA valid from `now` (unix seconds) for `lifetime`.
pub fn new_ca(now: i64, lifetime: Duration) -> Result<CaPair, TlsError> {
    let key = KeyPair::generate().map_err(TlsError::Issue)?;
    let serial = serial()?;
    let name = format!("Terna cluster CA {:x}", now);
    let mut params = ca_params(&name);
    params.serial_number = Some(serial);
    params.not_before = datetime(now - BACKDATE_SECS)?;
    params.not_after = datetime(now.saturating_add(secs(lifetime)))?;
    let cert = params.self_signed(&key).map_err(TlsError::Issue)?;
    Ok(CaPair {
        name,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        created: now,
        not_after: now.saturating_add(secs(lifetime)),
    })
}

/// A leaf for `identity` signed by `ca`, valid from `now` for `lifetime`
/// (never past the CA's own end), good for both ends of a connection.
pub fn issue_leaf(
    ca: &CaPair,
    identity: &str,
    now: i64,
    lifetime: Duration,
) -> Result<Leaf, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(TlsError::Issue)?;
    let issuer = Issuer::new(ca_params(&ca.name), ca_key);
    let key = KeyPair::generate().map_err(TlsError::Issue)?;
    let dns = dns_name(identity)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Terna");
    dn.push(DnType::CommonName, identity);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(dns.try_into().map_err(TlsError::Issue)?)];
    params.serial_number = Some(serial()?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let not_after = now.saturating_add(secs(lifetime)).min(ca.not_after);
    params.not_before = datetime(now - BACKDATE_SECS)?;
    params.not_after = datetime(not_after)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::Issue)?;
    Ok(Leaf {
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
        not_after,
    })
}

impl CaSet {
    /// A set of one new CA.
    pub fn create(now: i64, lifetime: Duration) -> Result<CaSet, TlsError> {
        Ok(CaSet {
            current: new_ca(now, lifetime)?,
            next: None,
            previous: None,
            changed: now,
        })
    }

    /// The certificates (PEM) every peer's chain may end in.
    pub fn trusted(&self) -> Vec<&str> {
        let mut all = vec![self.current.cert_pem.as_str()];
        all.extend(self.next.as_ref().map(|n| n.cert_pem.as_str()));
        all.extend(self.previous.as_ref().map(|p| p.cert_pem.as_str()));
        all
    }

    /// The step a rotation takes from here.
    pub fn next_step(&self) -> Step {
        if self.next.is_some() {
            Step::Promote
        } else if self.previous.is_some() {
            Step::Retire
        } else {
            Step::Stage
        }
    }

    /// The step `schedule` asks for at `now`, if any: a rotation under way
    /// goes on once the last step has had its dwell; a CA past two thirds
    /// of its life is replaced.
    pub fn due(&self, now: i64, schedule: &Schedule) -> Option<Step> {
        if now.saturating_sub(self.changed) < secs(schedule.dwell) {
            return None;
        }
        match self.next_step() {
            Step::Stage => {
                let life = self.current.not_after - self.current.created;
                (now >= self.current.created + life * 2 / 3).then_some(Step::Stage)
            }
            step => Some(step),
        }
    }

    /// This set after `step` at `now`.
    pub fn rotated(&self, step: Step, now: i64, lifetime: Duration) -> Result<CaSet, TlsError> {
        let mut set = self.clone();
        match (step, set.next.take()) {
            (Step::Stage, None) => set.next = Some(new_ca(now, lifetime)?),
            (Step::Promote, Some(next)) => {
                let old = std::mem::replace(&mut set.current, next);
                set.previous = Some(RetiringCa {
                    name: old.name,
                    cert_pem: old.cert_pem,
                });
            }
            (Step::Retire, None) if set.previous.is_some() => set.previous = None,
            (step, _) => return Err(TlsError::OutOfOrder(step, self.next_step())),
        }
        set.changed = now;
        Ok(set)
    }

    pub fn to_json(&self) -> Result<Vec<u8>, TlsError> {
        serde_json::to_vec_pretty(self).map_err(|e| TlsError::Decode(e.to_string()))
    }

    pub fn from_json(bytes: &[u8]) -> Result<CaSet, TlsError> {
        serde_json::from_slice(bytes).map_err(|e| TlsError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 24 * 3600;

    #[test]
    fn rotation_goes_stage_promote_retire_and_keeps_the_old_ca_trusted_until_retired() {
        let set = CaSet::create(NOW, CA_LIFETIME).expect("ca");
        let first = set.current.cert_pem.clone();
        let staged = set
            .rotated(Step::Stage, NOW + 1, CA_LIFETIME)
            .expect("stage");
        assert_eq!(staged.current.cert_pem, first, "staging changes no signer");
        assert_eq!(staged.trusted().len(), 2);
        let promoted = staged
            .rotated(Step::Promote, NOW + 2, CA_LIFETIME)
            .expect("promote");
        assert_ne!(promoted.current.cert_pem, first);
        assert!(promoted.trusted().contains(&first.as_str()));
        let retired = promoted
            .rotated(Step::Retire, NOW + 3, CA_LIFETIME)
            .expect("retire");
        assert_eq!(retired.trusted(), vec![promoted.current.cert_pem.as_str()]);
        assert_eq!(retired.next_step(), Step::Stage);
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let set = CaSet::create(NOW, CA_LIFETIME).expect("ca");
        assert!(matches!(
            set.rotated(Step::Promote, NOW, CA_LIFETIME),
            Err(TlsError::OutOfOrder(Step::Promote, Step::Stage))
        ));
        assert!(set.rotated(Step::Retire, NOW, CA_LIFETIME).is_err());
    }

    #[test]
    fn the_schedule_waits_out_the_dwell_and_stages_at_two_thirds_of_life() {
        let schedule = Schedule {
            ca_lifetime: Duration::from_secs(90 * DAY as u64),
            dwell: Duration::from_secs(3600),
        };
        let set = CaSet::create(NOW, schedule.ca_lifetime).expect("ca");
        assert_eq!(set.due(NOW + 59 * DAY, &schedule), None);
        assert_eq!(set.due(NOW + 60 * DAY, &schedule), Some(Step::Stage));
        let staged = set
            .rotated(Step::Stage, NOW + 60 * DAY, schedule.ca_lifetime)
            .expect("stage");
        assert_eq!(staged.due(NOW + 60 * DAY + 3599, &schedule), None);
        assert_eq!(
            staged.due(NOW + 60 * DAY + 3600, &schedule),
            Some(Step::Promote)
        );
    }

    #[test]
    fn a_leaf_never_outlives_its_ca_and_names_its_identity() {
        let ca = new_ca(NOW, Duration::from_secs(3600)).expect("ca");
        let leaf = issue_leaf(&ca, "Node-A", NOW, LEAF_LIFETIME).expect("leaf");
        assert_eq!(leaf.not_after, ca.not_after);
        let der = rustls::pki_types::CertificateDer::from(leaf.cert_der.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der).expect("parses");
        let name = rustls::pki_types::ServerName::try_from("node-a.node.terna").expect("name");
        cert.verify_is_valid_for_subject_name(&name)
            .expect("names node-a");
    }

    #[test]
    fn identities_that_are_no_dns_label_are_refused() {
        assert!(dns_name("node a").is_err());
        assert!(dns_name("").is_err());
        assert_eq!(dns_name("n1").expect("ok"), "n1.node.terna");
    }

    #[test]
    fn the_json_form_round_trips_and_debug_never_shows_a_key() {
        let set = CaSet::create(NOW, CA_LIFETIME).expect("ca");
        let back = CaSet::from_json(&set.to_json().expect("json")).expect("parse");
        assert_eq!(back, set);
        assert!(!format!("{set:?}").contains("PRIVATE KEY"));
    }
}
