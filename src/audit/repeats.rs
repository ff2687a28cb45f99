//! `warn`, `skip` and `deferred` records repeat nothing: a record whose
//! fingerprint the previous reconcile already stated is not written again.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

use super::{Action, Outcome, Record};

/// What the previous reconcile stated (from the state file), and what this
/// one states.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    pub(super) previous: BTreeSet<u64>,
    pub(super) stated: BTreeSet<u64>,
}

impl Repeats {
    /// Notes what `record` states; true when it only repeats what the
    /// previous reconcile stated, so it is not written.
    pub(super) fn is_repeat(&mut self, record: &Record) -> bool {
        let Some(fp) = repeatable_fingerprint(record) else {
            return false;
        };
        self.stated.insert(fp);
        self.previous.contains(&fp)
    }
}

/// For a record that must not repeat (`warn`, `skip`, `deferred`), a
/// fingerprint of what it says: everything but its time, run and figures.
fn repeatable_fingerprint(r: &Record) -> Option<u64> {
    let repeatable =
        matches!(r.action, Action::Warn | Action::Skip) || r.outcome == Outcome::Deferred;
    if !repeatable {
        return None;
    }
    let said = serde_json::to_vec(&(
        r.action,
        r.outcome,
        &r.reference,
        &r.image,
        &r.rule,
        &r.reason,
        &r.error,
    ))
    .ok()?;
    let digest = Sha256::digest(&said);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Some(u64::from_be_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::super::{AuditLog, read, sample as rec};
    use super::*;

    fn warn(reason: &str) -> Record {
        Record {
            action: Action::Warn,
            reference: Some("app:bad tag".into()),
            rule: Some("names".into()),
            reason: reason.into(),
            bytes: None,
            duration_ms: None,
            ..rec(0)
        }
    }

    #[test]
    fn warn_records_repeat_only_when_what_they_say_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let mut stated = BTreeSet::new();
        for reason in ["bad", "bad", "bad", "worse", "bad"] {
            let mut log = AuditLog::open_lenient(&p, u64::MAX);
            log.set_previously_stated(stated);
            log.append(&warn(reason));
            // Actions always get their record.
            log.append(&rec(1));
            stated = log.stated().clone();
        }
        let h = read(&p).unwrap();
        let warns: Vec<_> = h
            .records
            .iter()
            .filter(|r| r.action == Action::Warn)
            .map(|r| r.reason.as_str())
            .collect();
        assert_eq!(warns, ["bad", "worse", "bad"]);
        assert_eq!(h.records.len() - warns.len(), 5);
    }
}
