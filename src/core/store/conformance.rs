//! One behavioural suite every `StateStore` passes: `FileStore` from the
//! unit tests, `KubeStore` against a real API server from
//! `tests/conformance.rs`. It is public only so that integration test can
//! call the very same suite; nothing in the driver uses it.
#![doc(hidden)]
// Test code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::Barrier;

use crate::core::class::VolumeClass;
use crate::core::error::ErrorKind;
use crate::core::store::StateStore;
use crate::core::volume::{Phase, ReplicaRecord, ReplicaState, VolumeRecord, volume_id_for};

/// A record as the controller makes them (its class is what its
/// parameters say), for volume `name` of `prefix`: stores that share a
/// backend between runs stay apart by prefix.
pub fn record(prefix: &str, name: &str) -> VolumeRecord {
    let parameters = [("replicas".to_string(), "2".to_string())].into();
    VolumeRecord {
        id: volume_id_for(&format!("{prefix}/{name}")),
        name: name.into(),
        capacity_bytes: 1 << 30,
        class: VolumeClass::parse(&parameters).unwrap(),
        parameters,
        phase: Phase::Ready,
        created_at_ns: 1,
        generation: 1,
        replicas: (0..2)
            .map(|i| ReplicaRecord {
                pool: format!("p{i}"),
                node: format!("n{i}"),
                domain: format!("n{i}"),
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

/// `store` must hold no record of its own before; `prefix` keeps the
/// suite's ids apart from other runs on a shared backend.
pub fn run(store: &dyn StateStore, prefix: &str) {
    let records: Vec<VolumeRecord> = (0..3).map(|i| record(prefix, &format!("v{i}"))).collect();
    let mut sorted = records.clone();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));

    // Get of a missing record; put creates, and replaces.
    assert_eq!(store.get(&records[0].id).unwrap(), None);
    // In an order other than by id, so list has to sort.
    for r in sorted.iter().rev() {
        store.put(r).unwrap();
    }
    assert_eq!(
        store.get(&records[0].id).unwrap().as_ref(),
        Some(&records[0])
    );
    let mut changed = records[0].clone();
    changed.phase = Phase::Deleting;
    changed.capacity_bytes *= 2;
    changed.replicas[1].state = ReplicaState::Faulted {
        generation: 1,
        reason: "gone".into(),
        since: 7,
        replaced: false,
    };
    changed.generation = 2;
    changed.published = vec!["/p".into()];
    store.put(&changed).unwrap();
    assert_eq!(store.get(&changed.id).unwrap().as_ref(), Some(&changed));
    store.put(&records[0]).unwrap();
    assert_eq!(
        store.get(&records[0].id).unwrap().as_ref(),
        Some(&records[0])
    );

    // List: every record, ordered by id.
    assert_eq!(store.list().unwrap(), sorted);

    // Insert refuses an existing id, and leaves the record as it was.
    let err = store.insert(&changed).unwrap_err();
    assert_eq!(err.kind, ErrorKind::AlreadyExists, "{err}");
    assert_eq!(
        store.get(&records[0].id).unwrap().as_ref(),
        Some(&records[0])
    );
    let fresh = record(prefix, "inserted");
    store.insert(&fresh).unwrap();
    assert_eq!(store.get(&fresh.id).unwrap().as_ref(), Some(&fresh));

    // Two racing inserts of one id: exactly one wins, and its record stays.
    for round in 0..5 {
        let base = record(prefix, &format!("race-{round}"));
        let barrier = Barrier::new(2);
        let results: Vec<_> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2u64)
                .map(|i| {
                    let mut mine = base.clone();
                    mine.capacity_bytes += i;
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        (mine.capacity_bytes, store.insert(&mine))
                    })
                })
                .collect();
            racers.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let won: Vec<u64> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for (_, r) in &results {
            if let Err(e) = r {
                assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
            }
        }
        let stored = store.get(&base.id).unwrap().unwrap();
        assert_eq!(stored.capacity_bytes, won[0], "round {round}");
        store.remove(&base.id).unwrap();
    }

    // Update: None for a missing record, and the closure was not called
    // with anything.
    let missing = record(prefix, "missing");
    let mut called = false;
    let got = store
        .update(&missing.id, &mut |_| {
            called = true;
            Ok(true)
        })
        .unwrap();
    assert!(got.is_none() && !called);
    assert_eq!(
        store.get(&missing.id).unwrap(),
        None,
        "update created nothing"
    );

    // A change the closure says is none is not written.
    let id = records[1].id.clone();
    let got = store
        .update(&id, &mut |r| {
            r.name = "not written".into();
            Ok(false)
        })
        .unwrap()
        .unwrap();
    assert_eq!(got.name, "not written", "the caller sees what it did");
    assert_eq!(store.get(&id).unwrap().as_ref(), Some(&records[1]));
    // A real one is, and is returned.
    let got = store
        .update(&id, &mut |r| {
            r.published.push("/t".into());
            Ok(true)
        })
        .unwrap()
        .unwrap();
    assert_eq!(got.published, ["/t"]);
    assert_eq!(store.get(&id).unwrap().as_ref(), Some(&got));
    // A closure's error is the update's, and writes nothing.
    let err = store
        .update(&id, &mut |r| {
            r.published.clear();
            Err(crate::core::error::Error::precondition("refused"))
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::FailedPrecondition);
    assert_eq!(store.get(&id).unwrap().as_ref(), Some(&got));

    // Concurrent updates from several threads all apply, none lost and
    // none applied twice, also when one changes what a store may keep in
    // two places (the capacity in a TernaVolume's spec, the generation and
    // publications in its status).
    let (threads, rounds) = (4u64, 10u64);
    let start = store.get(&id).unwrap().unwrap();
    std::thread::scope(|s| {
        for t in 0..threads {
            let id = &id;
            s.spawn(move || {
                for i in 0..rounds {
                    store
                        .update(id, &mut |r| {
                            r.generation += 1;
                            r.capacity_bytes += 1;
                            r.published.push(format!("/t{t}-{i}"));
                            Ok(true)
                        })
                        .unwrap()
                        .unwrap();
                }
            });
        }
    });
    let end = store.get(&id).unwrap().unwrap();
    assert_eq!(end.generation, start.generation + threads * rounds);
    assert_eq!(end.capacity_bytes, start.capacity_bytes + threads * rounds);
    assert_eq!(end.published.len() as u64, 1 + threads * rounds);

    // Remove is idempotent, and removes only its record.
    store.remove(&fresh.id).unwrap();
    store.remove(&fresh.id).unwrap();
    assert_eq!(store.get(&fresh.id).unwrap(), None);
    store.remove(&missing.id).unwrap();
    let mut left = sorted.clone();
    if let Some(r) = left.iter_mut().find(|r| r.id == id) {
        *r = end.clone();
    }
    assert_eq!(store.list().unwrap(), left);
    for r in &sorted {
        store.remove(&r.id).unwrap();
    }
    assert_eq!(store.list().unwrap(), vec![]);
}
