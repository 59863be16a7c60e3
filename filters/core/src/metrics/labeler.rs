//! Turns a request's raw values into bounded, interned label ids, once.

use crate::config::{Config, Naming, WorkloadRef};
use crate::labels::{
    Admission, AdmissionControl, Dimension, LabelTable, Resolved, ValueId, UNKNOWN_ID,
};
use crate::request::RequestRecord;

/// Label values of one request after admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestLabels {
    pub route: ValueId,
    pub tenant: ValueId,
    pub model: ValueId,
    pub route_class: ValueId,
    pub team: ValueId,
    pub backend: ValueId,
    pub collection: ValueId,
    /// The response's `model`, bounded like `model` (resolved only for the
    /// GenAI naming's `gen_ai_response_model`).
    pub response_model: ValueId,
}

impl RequestLabels {
    pub fn get(&self, d: Dimension) -> ValueId {
        match d {
            Dimension::Route => self.route,
            Dimension::Tenant => self.tenant,
            Dimension::Model => self.model,
            Dimension::RouteClass => self.route_class,
            Dimension::Team => self.team,
            Dimension::Backend => self.backend,
            Dimension::Collection => self.collection,
        }
    }
}

/// Dimensions whose value overflowed while resolving one request (a set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overflowed(u8);

impl Overflowed {
    fn add(&mut self, d: Dimension) {
        self.0 |= 1 << (d as u8);
    }

    /// The overflowed dimensions, in [`Dimension::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Dimension> {
        Dimension::ALL
            .into_iter()
            .filter(move |d| self.0 & (1 << (*d as u8)) != 0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// Owns the label tables and the admission control of one VM.
pub struct Labeler {
    tables: Vec<LabelTable>,
    admission: Box<dyn AdmissionControl>,
    naming: Naming,
    provider_name: String,
}

impl Labeler {
    pub fn new(config: &Config, admission: Box<dyn AdmissionControl>) -> Self {
        let tables = Dimension::ALL
            .iter()
            .map(|&d| {
                let adm = config
                    .admissions
                    .get(&d)
                    .cloned()
                    .unwrap_or(Admission::Static(Vec::new()));
                LabelTable::new(d, adm, config.max_value_length)
            })
            .collect();
        let provider_name = config.metrics.provider_name.clone().unwrap_or_default();
        Self {
            tables,
            admission,
            naming: config.metrics.naming,
            provider_name,
        }
    }

    /// The configured metric naming.
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// `gen_ai_provider_name`.
    pub fn provider_name(&self) -> &str {
        &self.provider_name
    }

    /// The text of a label id.
    pub fn text(&self, d: Dimension, id: ValueId) -> &str {
        // `tables` is built from `Dimension::ALL`, in order.
        self.tables
            .get(d as usize)
            .map(|t| t.value(id))
            .unwrap_or(crate::labels::UNKNOWN)
    }

    /// Resolves a raw value, noting an overflow.
    pub fn resolve(
        &mut self,
        d: Dimension,
        raw: Option<&[u8]>,
        overflowed: &mut Overflowed,
    ) -> ValueId {
        let Some(table) = self.tables.get_mut(d as usize) else {
            return UNKNOWN_ID;
        };
        let r: Resolved = table.resolve(raw, self.admission.as_mut());
        if r.overflowed {
            overflowed.add(d);
        }
        r.id
    }

    fn resolve_str(&mut self, d: Dimension, raw: Option<&str>, o: &mut Overflowed) -> ValueId {
        self.resolve(d, raw.map(str::as_bytes), o)
    }

    /// Labels known at request headers (the in-flight gauge's): the route
    /// label and the route's workload.
    pub fn start_labels(
        &mut self,
        route_label: Option<&[u8]>,
        workload: &WorkloadRef<'_>,
        overflowed: &mut Overflowed,
    ) -> RequestLabels {
        RequestLabels {
            route: self.resolve(Dimension::Route, route_label, overflowed),
            route_class: self.resolve_str(Dimension::RouteClass, workload.route_class, overflowed),
            team: self.resolve_str(Dimension::Team, workload.team, overflowed),
            ..RequestLabels::default()
        }
    }

    /// Every label of a finished request; the route label comes from `start`
    /// (resolved once, at request headers).
    pub fn request_labels(
        &mut self,
        start: &RequestLabels,
        rec: &RequestRecord,
        overflowed: &mut Overflowed,
    ) -> RequestLabels {
        let model = rec.request_model.as_ref().or(rec.response_model.as_ref());
        let response_model = if self.naming.gen_ai() {
            let m = rec.response_model.as_deref();
            self.resolve_str(Dimension::Model, m, overflowed)
        } else {
            UNKNOWN_ID
        };
        RequestLabels {
            response_model,
            route: start.route,
            tenant: self.resolve(Dimension::Tenant, rec.tenant.as_deref(), overflowed),
            model: self.resolve_str(Dimension::Model, model.map(String::as_str), overflowed),
            route_class: self.resolve_str(
                Dimension::RouteClass,
                rec.route_class.as_deref(),
                overflowed,
            ),
            team: self.resolve_str(Dimension::Team, rec.team.as_deref(), overflowed),
            backend: self.resolve(Dimension::Backend, rec.backend_label.as_deref(), overflowed),
            collection: self.resolve_str(
                Dimension::Collection,
                rec.rag_collection.as_deref(),
                overflowed,
            ),
        }
    }

    /// Resolves every label of a record from scratch (tests and tools that
    /// have no request-headers step).
    pub fn labels_of(&mut self, rec: &RequestRecord) -> (RequestLabels, Overflowed) {
        let mut o = Overflowed::default();
        let start = RequestLabels {
            route: self.resolve(Dimension::Route, rec.route_label.as_deref(), &mut o),
            ..RequestLabels::default()
        };
        (self.request_labels(&start, rec, &mut o), o)
    }
}
