//! [`GpuSource`] over the real NVML library, loaded at run time through
//! `nvml-wrapper` (so a node without the driver still runs the exporter).
//!
//! Every reading is its own call whose failure only blanks that reading. A
//! GPU that answers GPU_IS_LOST is reported lost and the device list is
//! rebuilt on the next pass. XID errors arrive on a separate thread that
//! waits on an NVML event set and queues them for the next pass.

use std::collections::HashSet;
use std::ffi::c_uint;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{
    mig_profile_from_name, CallError, DeviceIdentity, DeviceReading, GpuReading, GpuSource,
    MemoryReading, MigReading, NvmlStatus, ProcessReading, XidEvent,
};
use crate::health::ErrorKind;

/// How the NVML source finds and uses the library.
#[derive(Clone, Debug)]
pub struct NvmlConfig {
    /// Library to load; `None` means the default `libnvidia-ml.so.1`.
    pub lib_path: Option<PathBuf>,
    /// How long to wait before trying to load NVML again after a failure.
    pub retry_interval: Duration,
    /// Watch for XID errors on a background thread.
    pub xid_events: bool,
}

/// Maps an NVML error to the exported kind. `None` means "not an error":
/// the value simply does not exist on this device.
pub fn error_kind(err: &NvmlError) -> Option<ErrorKind> {
    match err {
        NvmlError::NotSupported | NvmlError::NotFound => None,
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
            Some(ErrorKind::LibraryNotFound)
        }
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => {
            Some(ErrorKind::SymbolMissing)
        }
        NvmlError::DriverNotLoaded | NvmlError::LibRmVersionMismatch => {
            Some(ErrorKind::DriverNotLoaded)
        }
        NvmlError::NoPermission | NvmlError::OperatingSystem => Some(ErrorKind::NoPermission),
        NvmlError::GpuLost | NvmlError::ResetRequired => Some(ErrorKind::GpuLost),
        NvmlError::Timeout => Some(ErrorKind::Timeout),
        _ => Some(ErrorKind::Unknown),
    }
}

fn is_lost(err: &NvmlError) -> bool {
    matches!(err, NvmlError::GpuLost | NvmlError::ResetRequired)
}

/// State shared with the XID thread.
#[derive(Default)]
struct XidShared {
    stop: AtomicBool,
    /// Bumped when the device list changes, so the thread re-registers.
    generation: AtomicU64,
    inbox: Mutex<XidInbox>,
}

#[derive(Default)]
struct XidInbox {
    events: Vec<XidEvent>,
    errors: Vec<CallError>,
    healthy: bool,
}

impl XidShared {
    fn inbox(&self) -> std::sync::MutexGuard<'_, XidInbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, call: &'static str, err: &NvmlError) {
        if let Some(kind) = error_kind(err) {
            self.inbox().errors.push(CallError {
                call,
                kind,
                from_events: true,
            });
        }
    }
}

struct XidWatcher {
    shared: Arc<XidShared>,
    thread: Option<JoinHandle<()>>,
}

impl XidWatcher {
    fn start(nvml: Arc<Nvml>) -> std::io::Result<Self> {
        let shared = Arc::new(XidShared::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("xid-events".into())
            .stack_size(256 * 1024)
            .spawn(move || xid_loop(&nvml, &thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for XidWatcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

const XID_WAIT_MS: u32 = 250;
const XID_RETRY: Duration = Duration::from_secs(15);

fn sleep_unless_stopped(shared: &XidShared, total: Duration) {
    let deadline = Instant::now() + total;
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
    }
}

/// Frees an event set through the error-returning call (the `Drop` impl of
/// `EventSet` would panic if the symbol were missing).
fn release(set: EventSet<'_>) {
    let _ = set.release_events();
}

/// Builds an event set with every GPU that accepts XID registration.
/// `register_events` frees the set when a device refuses, so a refusal means
/// starting a new set without that device.
fn register_all<'n>(nvml: &'n Nvml, shared: &XidShared) -> Result<Option<EventSet<'n>>, NvmlError> {
    let count = nvml.device_count()?;
    let mut skip: HashSet<u32> = HashSet::new();
    'attempt: loop {
        let mut set = nvml.create_event_set()?;
        let mut registered = 0;
        for index in 0..count {
            if skip.contains(&index) {
                continue;
            }
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    shared.error("nvmlDeviceGetHandleByIndex", &e);
                    skip.insert(index);
                    continue;
                }
            };
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(kept) => {
                    set = kept;
                    registered += 1;
                }
                Err(e) => {
                    shared.error("nvmlDeviceRegisterEvents", &e.error);
                    skip.insert(index);
                    continue 'attempt;
                }
            }
        }
        if registered == 0 {
            release(set);
            return Ok(None);
        }
        return Ok(Some(set));
    }
}

fn xid_loop(nvml: &Nvml, shared: &XidShared) {
    while !shared.stop.load(Ordering::SeqCst) {
        let generation = shared.generation.load(Ordering::SeqCst);
        let set = match register_all(nvml, shared) {
            Ok(Some(set)) => set,
            Ok(None) => {
                shared.inbox().healthy = false;
                sleep_unless_stopped(shared, XID_RETRY);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "XID events unavailable; retrying in {:?}", XID_RETRY);
                shared.error("nvmlEventSetCreate", &e);
                shared.inbox().healthy = false;
                sleep_unless_stopped(shared, XID_RETRY);
                continue;
            }
        };
        shared.inbox().healthy = true;
        while !shared.stop.load(Ordering::SeqCst)
            && shared.generation.load(Ordering::SeqCst) == generation
        {
            match set.wait(XID_WAIT_MS) {
                Ok(event) => {
                    let xid = match event.event_data {
                        Some(XidError::Value(v)) => Some(v),
                        Some(XidError::Unknown) | None => None,
                    };
                    match event.device.uuid() {
                        Ok(gpu_uuid) => {
                            tracing::warn!(%gpu_uuid, ?xid, "XID error");
                            shared.inbox().events.push(XidEvent { gpu_uuid, xid });
                        }
                        Err(e) => shared.error("nvmlDeviceGetUUID", &e),
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    shared.error("nvmlEventSetWait", &e);
                    shared.inbox().healthy = false;
                    sleep_unless_stopped(shared, Duration::from_secs(1));
                    break;
                }
            }
        }
        release(set);
    }
}

/// Per-pass bookkeeping of one device's calls.
struct Calls<'a> {
    errors: &'a mut Vec<CallError>,
    lost: bool,
}

impl Calls<'_> {
    /// The value of a call, or `None` after recording why not. After a
    /// GPU_IS_LOST no further call is made on the device.
    fn get<T>(
        &mut self,
        call: &'static str,
        f: impl FnOnce() -> Result<T, NvmlError>,
    ) -> Option<T> {
        if self.lost {
            return None;
        }
        match f() {
            Ok(v) => Some(v),
            Err(e) => {
                if is_lost(&e) {
                    self.lost = true;
                }
                if let Some(kind) = error_kind(&e) {
                    self.errors.push(CallError {
                        call,
                        kind,
                        from_events: false,
                    });
                }
                None
            }
        }
    }
}

/// Reads GPUs through NVML; see the module docs.
pub struct NvmlSource {
    config: NvmlConfig,
    nvml: Option<Arc<Nvml>>,
    next_attempt: Instant,
    down: Option<(ErrorKind, String)>,
    driver_version: Option<String>,
    cuda_driver_version: Option<i32>,
    /// Identity per NVML index from the last enumeration.
    identities: Vec<Option<DeviceIdentity>>,
    needs_enumeration: bool,
    xid: Option<XidWatcher>,
    /// (call, kind) pairs already logged at warn level.
    warned: HashSet<(&'static str, ErrorKind)>,
}

impl NvmlSource {
    pub fn new(config: NvmlConfig) -> Self {
        Self {
            config,
            nvml: None,
            next_attempt: Instant::now(),
            down: None,
            driver_version: None,
            cuda_driver_version: None,
            identities: Vec::new(),
            needs_enumeration: true,
            xid: None,
            warned: HashSet::new(),
        }
    }

    fn library_name(&self) -> String {
        self.config
            .lib_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "libnvidia-ml.so.1".into())
    }

    /// Loads NVML if it is not loaded and a retry is due.
    fn ensure_loaded(&mut self) -> Option<Arc<Nvml>> {
        if let Some(nvml) = &self.nvml {
            return Some(nvml.clone());
        }
        if Instant::now() < self.next_attempt {
            return None;
        }
        self.next_attempt = Instant::now() + self.config.retry_interval;
        let mut builder = Nvml::builder();
        if let Some(path) = &self.config.lib_path {
            builder.lib_path(path.as_os_str());
        }
        match builder.init() {
            Ok(nvml) => {
                let nvml = Arc::new(nvml);
                self.driver_version = nvml.sys_driver_version().ok();
                self.cuda_driver_version = nvml.sys_cuda_driver_version().ok();
                tracing::info!(
                    library = %self.library_name(),
                    driver_version = self.driver_version.as_deref().unwrap_or("unknown"),
                    "NVML loaded"
                );
                if self.config.xid_events {
                    match XidWatcher::start(nvml.clone()) {
                        Ok(w) => self.xid = Some(w),
                        Err(e) => tracing::error!(error = %e, "cannot start the XID event thread"),
                    }
                }
                self.down = None;
                self.needs_enumeration = true;
                self.nvml = Some(nvml.clone());
                Some(nvml)
            }
            Err(e) => {
                let kind = error_kind(&e).unwrap_or(ErrorKind::Unknown);
                let message = format!(
                    "NVML unavailable from {} ({e}); GPU metrics are off, the exporter keeps \
                     serving its own metrics and retries every {:?}",
                    self.library_name(),
                    self.config.retry_interval
                );
                if self.down.as_ref().map(|(k, _)| *k) != Some(kind) {
                    tracing::error!(kind = %kind, "{message}");
                } else {
                    tracing::debug!(kind = %kind, "{message}");
                }
                self.down = Some((kind, message));
                None
            }
        }
    }

    fn identity(
        device: &Device<'_>,
        index: u32,
        uuid: String,
        errors: &mut Vec<CallError>,
    ) -> DeviceIdentity {
        let mut calls = Calls {
            errors,
            lost: false,
        };
        DeviceIdentity {
            index,
            uuid,
            name: calls
                .get("nvmlDeviceGetName", || device.name())
                .unwrap_or_default(),
            pci_bus_id: calls.get("nvmlDeviceGetPciInfo", || {
                device.pci_info().map(|p| p.bus_id)
            }),
            serial: calls.get("nvmlDeviceGetSerial", || device.serial()),
            minor_number: calls.get("nvmlDeviceGetMinorNumber", || device.minor_number()),
        }
    }

    fn warn_new_errors(&mut self, errors: &[CallError]) {
        for e in errors {
            if self.warned.insert((e.call, e.kind)) {
                tracing::warn!(call = e.call, kind = %e.kind, "NVML call failed (logged once per call and kind)");
            }
        }
    }
}

impl GpuSource for NvmlSource {
    fn collect(&mut self) -> GpuReading {
        let attempted = self.nvml.is_none() && Instant::now() >= self.next_attempt;
        let Some(nvml) = self.ensure_loaded() else {
            let (kind, message) = self
                .down
                .clone()
                .unwrap_or((ErrorKind::Unknown, "NVML not loaded".into()));
            let mut reading = GpuReading::down(kind, message);
            if attempted {
                // Counted once per load attempt, not once per pass.
                reading.errors.push(CallError {
                    call: "nvmlInit",
                    kind,
                    from_events: false,
                });
            }
            return reading;
        };
        let mut errors = Vec::new();
        let mut devices = Vec::new();
        let mut enumerated = false;

        match nvml.device_count() {
            Ok(count) => {
                if self.needs_enumeration || count as usize != self.identities.len() {
                    self.identities.resize(count as usize, None);
                    self.needs_enumeration = false;
                    enumerated = true;
                }
                for index in 0..count {
                    let reading = self.read_device(&nvml, index, &mut errors, &mut enumerated);
                    if let Some(r) = reading {
                        if r.lost {
                            self.needs_enumeration = true;
                        }
                        devices.push(r);
                    }
                }
            }
            Err(e) => {
                if let Some(kind) = error_kind(&e) {
                    errors.push(CallError {
                        call: "nvmlDeviceGetCount",
                        kind,
                        from_events: false,
                    });
                }
                self.needs_enumeration = true;
            }
        }

        let (xid_events, xid_watch_healthy) = match &self.xid {
            Some(w) => {
                if enumerated {
                    w.shared.generation.fetch_add(1, Ordering::SeqCst);
                }
                let mut inbox = w.shared.inbox();
                errors.append(&mut inbox.errors);
                (std::mem::take(&mut inbox.events), Some(inbox.healthy))
            }
            None => (Vec::new(), Some(false)),
        };
        self.warn_new_errors(&errors);
        GpuReading {
            nvml: NvmlStatus::Up {
                driver_version: self.driver_version.clone(),
                cuda_driver_version: self.cuda_driver_version,
            },
            devices,
            xid_events,
            xid_watch_healthy,
            errors,
            enumerated,
        }
    }
}

impl NvmlSource {
    fn read_device(
        &mut self,
        nvml: &Nvml,
        index: u32,
        errors: &mut Vec<CallError>,
        enumerated: &mut bool,
    ) -> Option<DeviceReading> {
        let cached = self.identities.get(index as usize).cloned().flatten();
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                if let Some(kind) = error_kind(&e) {
                    errors.push(CallError {
                        call: "nvmlDeviceGetHandleByIndex",
                        kind,
                        from_events: false,
                    });
                }
                // A lost GPU we saw before stays visible as lost.
                return match (is_lost(&e), cached) {
                    (true, Some(identity)) => Some(DeviceReading::lost(identity)),
                    _ => None,
                };
            }
        };
        let uuid = match device.uuid() {
            Ok(u) => u,
            Err(e) => {
                if let Some(kind) = error_kind(&e) {
                    errors.push(CallError {
                        call: "nvmlDeviceGetUUID",
                        kind,
                        from_events: false,
                    });
                }
                return match (is_lost(&e), cached) {
                    (true, Some(identity)) => Some(DeviceReading::lost(identity)),
                    _ => None,
                };
            }
        };
        let identity = match cached {
            Some(identity) if identity.uuid == uuid => identity,
            _ => {
                let identity = Self::identity(&device, index, uuid, errors);
                if let Some(slot) = self.identities.get_mut(index as usize) {
                    *slot = Some(identity.clone());
                }
                *enumerated = true;
                identity
            }
        };
        Some(read_values(nvml, &device, identity, errors))
    }
}

fn memory(m: nvml_wrapper::struct_wrappers::device::MemoryInfo) -> MemoryReading {
    MemoryReading {
        total_bytes: m.total,
        used_bytes: m.used,
        free_bytes: m.free,
        reserved_bytes: m.reserved,
    }
}

fn read_values(
    nvml: &Nvml,
    device: &Device<'_>,
    identity: DeviceIdentity,
    errors: &mut Vec<CallError>,
) -> DeviceReading {
    let mut c = Calls {
        errors,
        lost: false,
    };
    let utilization = c.get("nvmlDeviceGetUtilizationRates", || {
        device.utilization_rates()
    });
    let memory_info = c.get("nvmlDeviceGetMemoryInfo_v2", || {
        device.memory_info().map(memory)
    });
    let temperature = c.get("nvmlDeviceGetTemperature", || {
        device.temperature(TemperatureSensor::Gpu)
    });
    let power = c.get("nvmlDeviceGetPowerUsage", || device.power_usage());
    let power_limit = c.get("nvmlDeviceGetEnforcedPowerLimit", || {
        device.enforced_power_limit()
    });
    let energy = c.get("nvmlDeviceGetTotalEnergyConsumption", || {
        device.total_energy_consumption()
    });
    let sm_clock = c.get("nvmlDeviceGetClockInfo", || device.clock_info(Clock::SM));
    let mem_clock = c.get("nvmlDeviceGetClockInfo", || {
        device.clock_info(Clock::Memory)
    });
    let throttle = c.get("nvmlDeviceGetCurrentClocksThrottleReasons", || {
        device.current_throttle_reasons().map(|r| r.bits())
    });
    let ecc_corrected = c.get("nvmlDeviceGetTotalEccErrors", || {
        device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
    });
    let ecc_uncorrected = c.get("nvmlDeviceGetTotalEccErrors", || {
        device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
    });
    let pcie_replays = c.get("nvmlDeviceGetPcieReplayCounter", || {
        device.pcie_replay_counter()
    });
    let processes = c
        .get("nvmlDeviceGetComputeRunningProcesses_v3", || {
            device.running_compute_processes()
        })
        .unwrap_or_default()
        .into_iter()
        .map(|p| ProcessReading {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some(bytes),
                UsedGpuMemory::Unavailable => None,
            },
            gpu_instance_id: p.gpu_instance_id,
        })
        .collect();
    let mig_enabled = c.get("nvmlDeviceGetMigMode", || {
        device.mig_mode().map(|m| m.current == 1)
    });
    let mig = if mig_enabled == Some(true) {
        read_mig(nvml, device, &mut c)
    } else {
        Vec::new()
    };
    DeviceReading {
        identity,
        lost: c.lost,
        utilization_gpu_percent: utilization.as_ref().map(|u| u.gpu),
        utilization_memory_percent: utilization.as_ref().map(|u| u.memory),
        memory: memory_info,
        temperature_celsius: temperature,
        power_usage_milliwatts: power,
        power_limit_milliwatts: power_limit,
        energy_millijoules: energy,
        sm_clock_mhz: sm_clock,
        memory_clock_mhz: mem_clock,
        throttle_reasons: throttle,
        ecc_corrected,
        ecc_uncorrected,
        pcie_replays,
        mig_enabled,
        mig,
        processes,
    }
}

fn read_mig(nvml: &Nvml, device: &Device<'_>, c: &mut Calls<'_>) -> Vec<MigReading> {
    let Some(slots) = c.get("nvmlDeviceGetMaxMigDeviceCount", || {
        device.mig_device_count()
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for slot in 0..slots {
        let Some(mig) = c.get("nvmlDeviceGetMigDeviceHandleByIndex", || {
            device.mig_device_by_index(slot)
        }) else {
            continue;
        };
        let Some(uuid) = c.get("nvmlDeviceGetUUID", || mig.uuid()) else {
            continue;
        };
        let name = c
            .get("nvmlDeviceGetName", || mig.name())
            .unwrap_or_default();
        out.push(MigReading {
            uuid,
            gpu_instance_id: c.get("nvmlDeviceGetGpuInstanceId", || {
                instance_id(nvml, &mig, InstanceKind::Gpu)
            }),
            compute_instance_id: c.get("nvmlDeviceGetComputeInstanceId", || {
                instance_id(nvml, &mig, InstanceKind::Compute)
            }),
            profile: mig_profile_from_name(&name),
            memory: c.get("nvmlDeviceGetMemoryInfo_v2", || {
                mig.memory_info().map(memory)
            }),
        });
    }
    out
}

enum InstanceKind {
    Gpu,
    Compute,
}

/// GPU or compute instance id of a MIG device handle. nvml-wrapper 0.13 does
/// not wrap these two calls, so the resolved symbol is called directly.
#[allow(unsafe_code)]
fn instance_id(nvml: &Nvml, mig: &Device<'_>, kind: InstanceKind) -> Result<u32, NvmlError> {
    let lib = nvml.lib();
    let symbol = match kind {
        InstanceKind::Gpu => lib.nvmlDeviceGetGpuInstanceId.as_ref(),
        InstanceKind::Compute => lib.nvmlDeviceGetComputeInstanceId.as_ref(),
    };
    let function = symbol.map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let mut id: c_uint = 0;
    // SAFETY: `mig` is a live handle from this `nvml` (it borrows it), the
    // function has the NVML signature `(nvmlDevice_t, unsigned int *)`, and
    // `id` outlives the call.
    let code = unsafe { function(mig.handle(), &mut id) };
    nvml_wrapper::error::nvml_try(code)?;
    Ok(id)
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        // Stop the XID thread before NVML goes away, then shut NVML down
        // through the error-returning call.
        self.xid = None;
        if let Some(nvml) = self.nvml.take() {
            if let Ok(nvml) = Arc::try_unwrap(nvml) {
                if let Err(e) = nvml.shutdown() {
                    tracing::warn!(error = %e, "nvmlShutdown failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
