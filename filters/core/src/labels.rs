//! Bounded label values.
//!
//! Every label value that reaches a metric name comes through here. Values are
//! sanitised to a character set that survives Envoy tag extraction and
//! Prometheus, cut to a maximum length, and admitted into a bounded set per
//! label: either a static allowlist from configuration, or the first `cap`
//! distinct values seen by the whole Envoy process (shared across worker VMs
//! through proxy-wasm shared data). Anything else collapses to [`OVERFLOW`].
//! A flood of 100,000 distinct tenants therefore creates at most `cap + 2`
//! tenant values.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// A small, fast, non-cryptographic hasher (the rustc "Fx" scheme) for the
/// filter's internal maps. Their keys are bounded and never chosen by an
/// attacker in a way that matters: values are admitted (bounded) before they
/// are inserted, so hash flooding cannot grow anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct FxHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

/// A `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Value of a label whose input was present but not admitted.
pub const OVERFLOW: &str = "other";
/// Value of a label whose input was absent or empty.
pub const UNKNOWN: &str = "unknown";

/// Interned id of a label value; ids are per label table.
pub type ValueId = u16;
/// Id of [`UNKNOWN`] in every table.
pub const UNKNOWN_ID: ValueId = 0;
/// Id of [`OVERFLOW`] in every table.
pub const OVERFLOW_ID: ValueId = 1;

/// The label dimensions whose values come from requests or configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Route,
    Tenant,
    Model,
    RouteClass,
    Team,
    Backend,
    Collection,
}

impl Dimension {
    pub const ALL: [Dimension; 7] = [
        Dimension::Route,
        Dimension::Tenant,
        Dimension::Model,
        Dimension::RouteClass,
        Dimension::Team,
        Dimension::Backend,
        Dimension::Collection,
    ];

    /// The Prometheus label name.
    pub fn label_name(self) -> &'static str {
        match self {
            Dimension::Route => "route",
            Dimension::Tenant => "tenant",
            Dimension::Model => "model",
            Dimension::RouteClass => "route_class",
            Dimension::Team => "team",
            Dimension::Backend => "backend",
            Dimension::Collection => "collection",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label_name())
    }
}

fn safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/')
}

/// `raw` itself, when sanitising would not change it (the common case:
/// route, model and team names), so it can be looked up without a copy.
fn already_clean(raw: &[u8], max_len: usize) -> Option<&str> {
    if raw.is_empty() || raw.len() > max_len || !raw.iter().all(|&b| safe_byte(b)) {
        return None;
    }
    std::str::from_utf8(raw).ok()
}

/// Makes a raw header/body/property value safe for a stat name and a label.
///
/// Keeps ASCII letters, digits and `-_.:/`; every other byte becomes `_`, so
/// the tag-extraction separators (`=`, `;`) and whitespace can never appear.
/// Returns `None` when nothing is left (absent input maps to [`UNKNOWN`]).
///
/// ```
/// use tokentap_core::labels::sanitize;
///
/// assert_eq!(sanitize(b" acme corp;x=1 ", 64).as_deref(), Some("acme_corp_x_1"));
/// assert_eq!(sanitize(b"team-a/eu.1", 6).as_deref(), Some("team-a"));
/// assert_eq!(sanitize(b"   ", 64), None);
/// ```
pub fn sanitize(raw: &[u8], max_len: usize) -> Option<String> {
    if let Some(clean) = already_clean(raw, max_len) {
        return Some(clean.to_string());
    }
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    let out: String = trimmed
        .iter()
        .take(max_len)
        .map(|&b| if safe_byte(b) { b as char } else { '_' })
        .collect();
    Some(out)
}

/// How a label table decides which values it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Only these (already sanitised) values; everything else overflows.
    Static(Vec<String>),
    /// The first `cap` distinct values seen process-wide.
    Dynamic { cap: u32 },
}

/// Process-wide agreement on dynamically admitted values.
///
/// Each Envoy worker runs its own VM; without coordination every worker would
/// admit its own first `cap` values. The shell implements this over
/// proxy-wasm shared data; [`LocalAdmission`] is the single-VM version.
pub trait AdmissionControl {
    /// Whether `value` may become a label value of `dim`, given `cap`.
    fn admit(&mut self, dim: Dimension, value: &str, cap: u32) -> bool;
}

/// Admission for one VM (tests, and hosts without shared data).
#[derive(Clone, Debug, Default)]
pub struct LocalAdmission {
    seen: HashMap<Dimension, Vec<String>>,
}

impl AdmissionControl for LocalAdmission {
    fn admit(&mut self, dim: Dimension, value: &str, cap: u32) -> bool {
        let seen = self.seen.entry(dim).or_default();
        if seen.iter().any(|v| v == value) {
            return true;
        }
        if seen.len() as u32 >= cap {
            return false;
        }
        seen.push(value.to_string());
        true
    }
}

/// A key/value store with compare-and-swap, as proxy-wasm shared data offers.
pub trait SharedStore {
    /// The value and its CAS token, if the key exists.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value`; with `cas != 0` only if the key's token still equals it.
    fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// Why a [`SharedStore::set`] did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("compare-and-swap token mismatch")]
    CasMismatch,
    #[error("shared data unavailable")]
    Unavailable,
}

/// [`AdmissionControl`] over a [`SharedStore`]: a CAS-incremented counter per
/// dimension plus one marker key per admitted value.
///
/// Two VMs racing on the very first value of a dimension can both see the
/// counter missing; [`SharedAdmission::initialise`] (called at configure time,
/// on the main thread, before workers serve) creates the counters to close
/// that window.
#[derive(Debug)]
pub struct SharedAdmission<S> {
    store: S,
    full: HashMap<Dimension, bool>,
}

const CAS_RETRIES: usize = 8;

impl<S: SharedStore> SharedAdmission<S> {
    pub fn new(store: S) -> Self {
        Self {
            store,
            full: HashMap::new(),
        }
    }

    fn count_key(dim: Dimension) -> String {
        format!("tokentap.labels.{dim}.count")
    }

    fn value_key(dim: Dimension, value: &str) -> String {
        format!("tokentap.labels.{dim}.v.{value}")
    }

    /// Creates the per-dimension counters when missing.
    pub fn initialise(&mut self, dims: &[Dimension]) {
        for &dim in dims {
            let key = Self::count_key(dim);
            if self.store.get(&key).is_none() {
                let _ = self.store.set(&key, b"0", 0);
            }
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }
}

impl<S: SharedStore> AdmissionControl for SharedAdmission<S> {
    fn admit(&mut self, dim: Dimension, value: &str, cap: u32) -> bool {
        let value_key = Self::value_key(dim, value);
        if self.store.get(&value_key).is_some() {
            return true;
        }
        if self.full.get(&dim).copied().unwrap_or(false) {
            return false;
        }
        let count_key = Self::count_key(dim);
        for _ in 0..CAS_RETRIES {
            let (count, cas) = match self.store.get(&count_key) {
                Some((bytes, cas)) => (
                    std::str::from_utf8(&bytes)
                        .ok()
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(u32::MAX),
                    cas,
                ),
                None => (0, 0),
            };
            if count >= cap {
                self.full.insert(dim, true);
                return false;
            }
            let next = (count + 1).to_string();
            match self.store.set(&count_key, next.as_bytes(), cas) {
                Ok(()) => {
                    let _ = self.store.set(&value_key, b"1", 0);
                    return true;
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Unavailable) => return false,
            }
        }
        false
    }
}

/// The result of resolving a raw value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub id: ValueId,
    /// The input was present but not admitted (count it).
    pub overflowed: bool,
}

/// Interned, bounded values of one label dimension, local to a VM.
#[derive(Clone, Debug)]
pub struct LabelTable {
    dim: Dimension,
    admission: Admission,
    max_len: usize,
    values: Vec<String>,
    index: FxHashMap<String, ValueId>,
}

impl LabelTable {
    pub fn new(dim: Dimension, admission: Admission, max_len: usize) -> Self {
        let mut t = Self {
            dim,
            admission,
            max_len,
            values: vec![UNKNOWN.to_string(), OVERFLOW.to_string()],
            index: FxHashMap::default(),
        };
        t.index.insert(UNKNOWN.to_string(), UNKNOWN_ID);
        t.index.insert(OVERFLOW.to_string(), OVERFLOW_ID);
        if let Admission::Static(values) = &t.admission {
            for v in values.clone() {
                t.intern(v);
            }
        }
        t
    }

    pub fn dimension(&self) -> Dimension {
        self.dim
    }

    /// The value text of an id (`unknown` for ids this table never issued).
    pub fn value(&self, id: ValueId) -> &str {
        self.values
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or(UNKNOWN)
    }

    /// Number of distinct values, `unknown` and `other` included.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    fn intern(&mut self, value: String) -> ValueId {
        if let Some(&id) = self.index.get(&value) {
            return id;
        }
        let id = self.values.len() as ValueId;
        self.index.insert(value.clone(), id);
        self.values.push(value);
        id
    }

    /// Resolves a raw value (`None` = absent) to an admitted id.
    pub fn resolve(
        &mut self,
        raw: Option<&[u8]>,
        admission: &mut dyn AdmissionControl,
    ) -> Resolved {
        // Known values are found without sanitising into a new string.
        if let Some(&id) = raw
            .and_then(|r| already_clean(r, self.max_len))
            .and_then(|clean| self.index.get(clean))
        {
            return Resolved {
                id,
                overflowed: false,
            };
        }
        let Some(clean) = raw.and_then(|r| sanitize(r, self.max_len)) else {
            return Resolved {
                id: UNKNOWN_ID,
                overflowed: false,
            };
        };
        self.resolve_clean(clean, admission)
    }

    /// Resolves an already sanitised value.
    pub fn resolve_clean(
        &mut self,
        clean: String,
        admission: &mut dyn AdmissionControl,
    ) -> Resolved {
        if let Some(&id) = self.index.get(&clean) {
            return Resolved {
                id,
                overflowed: false,
            };
        }
        let admitted = match &self.admission {
            Admission::Static(_) => false,
            Admission::Dynamic { cap } => {
                // `cap + 2` bounds the local table even if the shared store
                // misbehaves.
                (self.values.len() as u32) < cap.saturating_add(2)
                    && admission.admit(self.dim, &clean, *cap)
            }
        };
        if admitted {
            Resolved {
                id: self.intern(clean),
                overflowed: false,
            }
        } else {
            Resolved {
                id: OVERFLOW_ID,
                overflowed: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn sanitize_keeps_safe_characters_only() {
        assert_eq!(sanitize(b" acme-1 ", 64).as_deref(), Some("acme-1"));
        assert_eq!(
            sanitize(b"a=.=b;.;c d\xc3\xa9", 64).as_deref(),
            Some("a_._b_._c_d__")
        );
        assert_eq!(
            sanitize(b"meta-llama/Llama-3.1-8B", 64).as_deref(),
            Some("meta-llama/Llama-3.1-8B")
        );
        assert_eq!(sanitize(b"   ", 64), None);
        assert_eq!(sanitize(b"abcdef", 3).as_deref(), Some("abc"));
    }

    #[test]
    fn static_tables_admit_only_configured_values() {
        let mut t = LabelTable::new(
            Dimension::Model,
            Admission::Static(vec!["mistral-7b".into()]),
            64,
        );
        let mut adm = LocalAdmission::default();
        let r = t.resolve(Some(b"mistral-7b"), &mut adm);
        assert!(!r.overflowed);
        assert_eq!(t.value(r.id), "mistral-7b");
        let r = t.resolve(Some(b"gpt-4"), &mut adm);
        assert_eq!((r.id, r.overflowed), (OVERFLOW_ID, true));
        let r = t.resolve(None, &mut adm);
        assert_eq!((r.id, r.overflowed), (UNKNOWN_ID, false));
    }

    #[test]
    fn a_flood_of_distinct_values_is_capped() {
        let mut t = LabelTable::new(Dimension::Tenant, Admission::Dynamic { cap: 50 }, 64);
        let mut adm = LocalAdmission::default();
        let mut overflowed = 0;
        for i in 0..100_000 {
            let v = format!("tenant-{i}");
            if t.resolve(Some(v.as_bytes()), &mut adm).overflowed {
                overflowed += 1;
            }
        }
        assert_eq!(t.len(), 52);
        assert_eq!(overflowed, 100_000 - 50);
        // Admitted values keep resolving to themselves.
        let r = t.resolve(Some(b"tenant-7"), &mut adm);
        assert_eq!(t.value(r.id), "tenant-7");
    }

    /// An in-memory store with proxy-wasm's CAS semantics, shared by "VMs".
    type Entries = HashMap<String, (Vec<u8>, u32)>;
    #[derive(Clone, Default)]
    struct MemStore(Rc<RefCell<(Entries, u32)>>);

    impl SharedStore for MemStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.0.borrow().0.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            let mut inner = self.0.borrow_mut();
            inner.1 += 1;
            let next = inner.1;
            match inner.0.get_mut(key) {
                Some(entry) => {
                    if cas != 0 && cas != entry.1 {
                        return Err(StoreError::CasMismatch);
                    }
                    *entry = (value.to_vec(), next);
                }
                None => {
                    inner.0.insert(key.to_string(), (value.to_vec(), next));
                }
            }
            Ok(())
        }
    }

    #[test]
    fn shared_admission_caps_across_vms() {
        let store = MemStore::default();
        let mut vms: Vec<(LabelTable, SharedAdmission<MemStore>)> = (0..4)
            .map(|_| {
                let mut adm = SharedAdmission::new(store.clone());
                adm.initialise(&[Dimension::Tenant]);
                (
                    LabelTable::new(Dimension::Tenant, Admission::Dynamic { cap: 10 }, 64),
                    adm,
                )
            })
            .collect();
        let mut admitted = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let vm = i % vms.len();
            let (table, adm) = &mut vms[vm];
            let v = format!("t{}", i % 37);
            let r = table.resolve(Some(v.as_bytes()), adm);
            if !r.overflowed {
                admitted.insert(table.value(r.id).to_string());
            }
        }
        assert_eq!(admitted.len(), 10, "{admitted:?}");
        // Every VM agrees on the admitted set.
        for (table, adm) in &mut vms {
            for v in &admitted {
                assert!(!table.resolve(Some(v.as_bytes()), adm).overflowed);
            }
        }
    }

    #[test]
    fn cas_conflicts_are_retried() {
        /// A store whose first CAS write always conflicts.
        struct Flaky {
            inner: MemStore,
            conflicts: u32,
        }
        impl SharedStore for Flaky {
            fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
                self.inner.get(key)
            }
            fn set(&mut self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
                if cas != 0 && self.conflicts > 0 {
                    self.conflicts -= 1;
                    return Err(StoreError::CasMismatch);
                }
                self.inner.set(key, value, cas)
            }
        }
        let mut adm = SharedAdmission::new(Flaky {
            inner: MemStore::default(),
            conflicts: 3,
        });
        adm.initialise(&[Dimension::Route]);
        assert!(adm.admit(Dimension::Route, "chat", 5));
        let count = adm.store().get("tokentap.labels.route.count").unwrap().0;
        assert_eq!(count, b"1");
    }
}
