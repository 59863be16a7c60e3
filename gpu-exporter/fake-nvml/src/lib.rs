//! A fake `libnvidia-ml.so` for machines without a GPU.
//!
//! It exports the NVML entry points that `nvml-wrapper` 0.13 calls for what
//! gpu-exporter reads (including the `_v2`/`_v3` variants and `nvmlShutdown`,
//! whose absence would make `Drop for Nvml` panic), with the C struct layouts
//! of `nvml-wrapper-sys` 0.10. Values come from a scenario file named by
//! `FAKE_NVML_SCENARIO` (see [`scenario`]); without one it shows
//! `FAKE_NVML_GPUS` (default 2) idle GPUs.
//!
//! Built with the `missing-symbols` feature it leaves out
//! `nvmlDeviceGetPowerUsage`, `nvmlDeviceGetTotalEnergyConsumption` and
//! `nvmlEventSetCreate`, so `dlsym` really fails for them.
//!
//! Device handles are small integers disguised as pointers; they are never
//! dereferenced, by us or by NVML callers.

// This crate *is* a C ABI: every export reads or writes caller-provided
// pointers, which needs `unsafe`. Each write goes through `put`/`put_str`,
// which check for null first. The C contract of each function is NVML's, so
// the exports carry no separate `# Safety` sections.
#![allow(unsafe_code)]
#![allow(non_snake_case)]
#![allow(clippy::missing_safety_doc)]

pub mod scenario;

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use scenario::{ErrorName, Feature, GpuSpec, MigSpec, Scenario};
use serde_json::Value;

type Ret = c_uint;
type Handle = *mut c_void;

const SUCCESS: Ret = 0;
const ERROR_UNINITIALIZED: Ret = 1;
const ERROR_INVALID_ARGUMENT: Ret = 2;
const ERROR_NOT_SUPPORTED: Ret = 3;
const ERROR_NO_PERMISSION: Ret = 4;
const ERROR_NOT_FOUND: Ret = 6;
const ERROR_INSUFFICIENT_SIZE: Ret = 7;
const ERROR_DRIVER_NOT_LOADED: Ret = 9;
const ERROR_TIMEOUT: Ret = 10;
const ERROR_GPU_IS_LOST: Ret = 15;
const ERROR_ARGUMENT_VERSION_MISMATCH: Ret = 25;
const ERROR_UNKNOWN: Ret = 999;

/// `nvmlEventTypeXidCriticalError`.
const EVENT_XID: u64 = 8;
/// `NVML_VALUE_NOT_AVAILABLE` as an unsigned long long.
const VALUE_NOT_AVAILABLE: u64 = u64::MAX;
/// `0xFFFFFFFF`: no GPU/compute instance in a process entry.
const NO_INSTANCE: u32 = u32::MAX;
/// Slots reported by `nvmlDeviceGetMaxMigDeviceCount` on a MIG-enabled GPU.
const MIG_SLOTS: u32 = 7;
/// Event set handles live above every device handle.
const EVENT_SET_BASE: usize = 0x10_0000;
const MIG_SHIFT: usize = 12;

#[repr(C)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

#[repr(C)]
pub struct Memory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

#[repr(C)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

#[repr(C)]
pub struct PciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// `nvmlProcessInfo_t` (v2 layout, used by the `_v3` process calls).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

#[repr(C)]
pub struct EventData {
    pub device: Handle,
    pub event_type: c_ulonglong,
    pub event_data: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileSig {
    len: u64,
    ino: u64,
    mtime_ns: i128,
}

enum Source {
    File {
        path: PathBuf,
        sig: Option<FileSig>,
        raw: Value,
    },
    Synthetic,
}

#[derive(Default)]
struct EventSet {
    /// GPU UUIDs registered for XID events.
    xid_gpus: Vec<String>,
    /// Per GPU UUID, how many of its `xid_events` this set has seen.
    delivered: HashMap<String, usize>,
}

struct Loaded {
    source: Source,
    started: Instant,
    applied_steps: usize,
    scenario: Scenario,
    init_count: u32,
    event_sets: HashMap<usize, EventSet>,
    // Unused when `nvmlEventSetCreate` is left out.
    #[cfg_attr(feature = "missing-symbols", allow(dead_code))]
    next_event_set: usize,
    /// Per GPU UUID, how many `xid_events` some event set has received. A set
    /// registered later starts there, as a real driver only reports XIDs that
    /// happen after registration (but nothing is lost before the first set).
    delivered_anywhere: HashMap<String, usize>,
}

static STATE: Mutex<Option<Loaded>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Loaded>> {
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn file_sig(path: &PathBuf) -> Option<FileSig> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileSig {
        len: meta.len(),
        ino: meta.ino(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

fn read_raw(path: &PathBuf) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Loaded {
    fn new() -> Result<Self, String> {
        let started = Instant::now();
        match std::env::var_os("FAKE_NVML_SCENARIO") {
            Some(path) => {
                let path = PathBuf::from(path);
                let sig = file_sig(&path);
                let raw = read_raw(&path)?;
                let (scenario, applied_steps) =
                    scenario::resolve(&raw, 0.0).map_err(|e| e.to_string())?;
                Ok(Self {
                    source: Source::File { path, sig, raw },
                    started,
                    applied_steps,
                    scenario,
                    init_count: 0,
                    event_sets: HashMap::new(),
                    next_event_set: 1,
                    delivered_anywhere: HashMap::new(),
                })
            }
            None => {
                let count = std::env::var("FAKE_NVML_GPUS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2);
                Ok(Self {
                    source: Source::Synthetic,
                    started,
                    applied_steps: 0,
                    scenario: scenario::synthetic(count),
                    init_count: 0,
                    event_sets: HashMap::new(),
                    next_event_set: 1,
                    delivered_anywhere: HashMap::new(),
                })
            }
        }
    }

    fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Re-reads the scenario file when it changed and applies timeline steps
    /// that fell due. A broken file keeps the previous scenario.
    fn refresh(&mut self) {
        let elapsed = self.elapsed_s();
        let Source::File { path, sig, raw } = &mut self.source else {
            return;
        };
        let mut changed = false;
        let now = file_sig(path);
        if now.is_some() && now != *sig {
            match read_raw(path) {
                Ok(new_raw) => {
                    *raw = new_raw;
                    *sig = now;
                    changed = true;
                }
                Err(e) => eprintln!("fake-nvml: keeping previous scenario: {e}"),
            }
        }
        if changed || scenario::due_steps(raw, elapsed) != self.applied_steps {
            match scenario::resolve(raw, elapsed) {
                Ok((scenario, applied)) => {
                    self.scenario = scenario;
                    self.applied_steps = applied;
                }
                Err(e) => eprintln!("fake-nvml: keeping previous scenario: {e}"),
            }
        }
    }

    fn visible(&self) -> impl Iterator<Item = &GpuSpec> {
        self.scenario.gpus.iter().filter(|g| !g.removed)
    }

    fn gpu_at(&self, position: usize) -> Option<&GpuSpec> {
        self.visible().nth(position)
    }
}

/// What a device handle points at.
enum Target<'a> {
    Gpu(usize, &'a GpuSpec),
    Mig(&'a GpuSpec, &'a MigSpec),
}

fn gpu_handle(position: usize) -> Handle {
    std::ptr::without_provenance_mut(position + 1)
}

fn mig_handle(position: usize, mig: usize) -> Handle {
    std::ptr::without_provenance_mut((position + 1) | ((mig + 1) << MIG_SHIFT))
}

fn resolve_handle(state: &Loaded, device: Handle) -> Result<Target<'_>, Ret> {
    let raw = device.addr();
    if raw == 0 || raw >= EVENT_SET_BASE {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    let mask = (1 << MIG_SHIFT) - 1;
    let position = (raw & mask).checked_sub(1).ok_or(ERROR_INVALID_ARGUMENT)?;
    let gpu = state.gpu_at(position).ok_or(ERROR_INVALID_ARGUMENT)?;
    if gpu.lost {
        return Err(ERROR_GPU_IS_LOST);
    }
    match (raw >> MIG_SHIFT).checked_sub(1) {
        None => Ok(Target::Gpu(position, gpu)),
        Some(mig) => gpu
            .mig
            .get(mig)
            .map(|m| Target::Mig(gpu, m))
            .ok_or(ERROR_INVALID_ARGUMENT),
    }
}

fn code(result: Result<Ret, Ret>) -> Ret {
    result.unwrap_or_else(|e| e)
}

/// Runs `f` on the initialised state.
fn with_state(f: impl FnOnce(&mut Loaded) -> Result<Ret, Ret>) -> Ret {
    let mut guard = lock();
    match guard.as_mut() {
        Some(state) if state.init_count > 0 => code(f(state)),
        _ => ERROR_UNINITIALIZED,
    }
}

/// Runs `f` on a whole-GPU handle that supports `feature`; MIG handles answer
/// NOT_SUPPORTED, as most readings do on real MIG devices.
fn with_gpu(
    device: Handle,
    feature: Option<Feature>,
    f: impl FnOnce(&GpuSpec, f64) -> Result<Ret, Ret>,
) -> Ret {
    with_state(|state| {
        let elapsed = state.elapsed_s();
        match resolve_handle(state, device)? {
            Target::Gpu(_, gpu) => {
                if feature.is_some_and(|feat| !gpu.supports(feat)) {
                    return Err(ERROR_NOT_SUPPORTED);
                }
                f(gpu, elapsed)
            }
            Target::Mig(..) => Err(ERROR_NOT_SUPPORTED),
        }
    })
}

unsafe fn put<T>(out: *mut T, value: T) -> Result<Ret, Ret> {
    if out.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null, and the caller promises it points at a writable T.
    unsafe { out.write(value) };
    Ok(SUCCESS)
}

unsafe fn put_str(buf: *mut c_char, len: c_uint, text: &str) -> Result<Ret, Ret> {
    if buf.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > len as usize {
        return Err(ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller promises `len` writable bytes at `buf`; we write
    // `bytes.len() + 1 <= len` of them.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(SUCCESS)
}

fn fill_c_chars<const N: usize>(text: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (slot, byte) in out.iter_mut().zip(text.bytes().take(N - 1)) {
        *slot = byte as c_char;
    }
    out
}

fn init_error(name: ErrorName) -> Ret {
    match name {
        ErrorName::DriverNotLoaded => ERROR_DRIVER_NOT_LOADED,
        ErrorName::NoPermission => ERROR_NO_PERMISSION,
        ErrorName::Unknown => ERROR_UNKNOWN,
    }
}

// ---------------------------------------------------------------- lifecycle

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> Ret {
    let mut guard = lock();
    if guard.is_none() {
        match Loaded::new() {
            Ok(state) => *guard = Some(state),
            Err(e) => {
                eprintln!("fake-nvml: cannot load scenario: {e}");
                return ERROR_UNKNOWN;
            }
        }
    }
    let Some(state) = guard.as_mut() else {
        return ERROR_UNKNOWN;
    };
    state.refresh();
    if let Some(err) = state.scenario.init_error {
        return init_error(err);
    }
    state.init_count += 1;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    nvmlInit_v2()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> Ret {
    with_state(|state| {
        state.init_count -= 1;
        Ok(SUCCESS)
    })
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let text: &CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_NOT_FOUND => c"Not Found",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_TIMEOUT => c"Timeout",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

// ------------------------------------------------------------------- system

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> Ret {
    with_state(|state| unsafe { put_str(buf, len, &state.scenario.driver_version) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(buf: *mut c_char, len: c_uint) -> Ret {
    with_state(|state| unsafe { put_str(buf, len, &state.scenario.nvml_version) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> Ret {
    with_state(|state| unsafe { put(version, state.scenario.cuda_driver_version) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> Ret {
    unsafe { nvmlSystemGetCudaDriverVersion_v2(version) }
}

// -------------------------------------------------------------- enumeration

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    with_state(|state| {
        state.refresh();
        unsafe { put(count, state.visible().count() as c_uint) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Handle) -> Ret {
    with_state(|state| {
        state.refresh();
        let position = index as usize;
        let gpu = state.gpu_at(position).ok_or(ERROR_INVALID_ARGUMENT)?;
        if gpu.lost {
            return Err(ERROR_GPU_IS_LOST);
        }
        unsafe { put(device, gpu_handle(position)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: Handle, index: *mut c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Gpu(position, _) => unsafe { put(index, position as c_uint) },
        Target::Mig(..) => Err(ERROR_INVALID_ARGUMENT),
    })
}

// ----------------------------------------------------------------- identity

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: Handle, buf: *mut c_char, len: c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Gpu(_, gpu) => unsafe { put_str(buf, len, &gpu.uuid) },
        Target::Mig(_, mig) => unsafe { put_str(buf, len, &mig.uuid) },
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(device: Handle, buf: *mut c_char, len: c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Gpu(_, gpu) => unsafe { put_str(buf, len, &gpu.name) },
        Target::Mig(_, mig) => unsafe { put_str(buf, len, &mig.name) },
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSerial(device: Handle, buf: *mut c_char, len: c_uint) -> Ret {
    with_gpu(device, Some(Feature::Serial), |gpu, _| unsafe {
        put_str(buf, len, &gpu.serial)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(device: Handle, minor: *mut c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Gpu(position, gpu) => unsafe {
            put(minor, gpu.minor_number.unwrap_or(position as c_uint))
        },
        Target::Mig(..) => Err(ERROR_NOT_SUPPORTED),
    })
}

/// Parses `DDDDDDDD:BB:DD.F` into (domain, bus, device).
fn parse_bus_id(bus_id: &str) -> (u32, u32, u32) {
    let mut parts = bus_id.split([':', '.']);
    let mut next = || {
        parts
            .next()
            .and_then(|p| u32::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    (next(), next(), next())
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: Handle, pci: *mut PciInfo) -> Ret {
    with_gpu(device, None, |gpu, _| {
        let (domain, bus, dev) = parse_bus_id(&gpu.pci_bus_id);
        let legacy = gpu.pci_bus_id.get(4..).unwrap_or(&gpu.pci_bus_id);
        let info = PciInfo {
            bus_id_legacy: fill_c_chars(legacy),
            domain,
            bus,
            device: dev,
            pci_device_id: 0x2330_10de,
            pci_sub_system_id: 0x16c1_10de,
            bus_id: fill_c_chars(&gpu.pci_bus_id),
        };
        unsafe { put(pci, info) }
    })
}

// ----------------------------------------------------------------- readings

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Handle,
    utilization: *mut Utilization,
) -> Ret {
    with_gpu(device, Some(Feature::Utilization), |gpu, _| unsafe {
        // As on real GPUs, utilization is not available in MIG mode.
        if !gpu.mig.is_empty() {
            return Err(ERROR_NOT_SUPPORTED);
        }
        put(
            utilization,
            Utilization {
                gpu: gpu.utilization_gpu_percent,
                memory: gpu.utilization_memory_percent,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Handle, memory: *mut Memory) -> Ret {
    with_gpu(device, Some(Feature::Memory), |gpu, _| unsafe {
        put(
            memory,
            Memory {
                total: gpu.memory_total_bytes,
                free: gpu.memory_free_bytes(),
                used: gpu.memory_used_bytes,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: Handle, memory: *mut MemoryV2) -> Ret {
    with_state(|state| {
        if memory.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null; the caller passes an initialised nvmlMemory_v2_t.
        let version = unsafe { (*memory).version };
        if version != MEMORY_V2_VERSION {
            return Err(ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let value = match resolve_handle(state, device)? {
            Target::Gpu(_, gpu) if !gpu.supports(Feature::Memory) => {
                return Err(ERROR_NOT_SUPPORTED)
            }
            Target::Gpu(_, gpu) => MemoryV2 {
                version,
                total: gpu.memory_total_bytes,
                reserved: gpu.memory_reserved_bytes,
                free: gpu.memory_free_bytes(),
                used: gpu.memory_used_bytes,
            },
            Target::Mig(_, mig) => MemoryV2 {
                version,
                total: mig.memory_total_bytes,
                reserved: mig.memory_reserved_bytes,
                free: mig.memory_free_bytes(),
                used: mig.memory_used_bytes,
            },
        };
        unsafe { put(memory, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: Handle,
    sensor: c_uint,
    temperature: *mut c_uint,
) -> Ret {
    with_gpu(device, Some(Feature::Temperature), |gpu, _| {
        if sensor != 0 {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        unsafe { put(temperature, gpu.temperature_celsius) }
    })
}

#[cfg(not(feature = "missing-symbols"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: Handle, milliwatts: *mut c_uint) -> Ret {
    with_gpu(device, Some(Feature::PowerUsage), |gpu, _| unsafe {
        put(milliwatts, gpu.power_usage_milliwatts)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: Handle,
    milliwatts: *mut c_uint,
) -> Ret {
    with_gpu(device, Some(Feature::PowerLimit), |gpu, _| unsafe {
        put(milliwatts, gpu.power_limit_milliwatts)
    })
}

#[cfg(not(feature = "missing-symbols"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: Handle,
    millijoules: *mut c_ulonglong,
) -> Ret {
    with_gpu(device, Some(Feature::Energy), |gpu, elapsed| unsafe {
        put(millijoules, gpu.energy_at(elapsed))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: Handle,
    clock_type: c_uint,
    mhz: *mut c_uint,
) -> Ret {
    with_gpu(device, Some(Feature::Clocks), |gpu, _| {
        let value = match clock_type {
            // NVML_CLOCK_GRAPHICS and NVML_CLOCK_SM run together on datacenter parts.
            0 | 1 => gpu.sm_clock_mhz,
            2 => gpu.memory_clock_mhz,
            _ => return Err(ERROR_NOT_SUPPORTED),
        };
        unsafe { put(mhz, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: Handle,
    reasons: *mut c_ulonglong,
) -> Ret {
    with_gpu(device, Some(Feature::Throttle), |gpu, _| unsafe {
        put(reasons, gpu.throttle_reasons)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: Handle,
    reasons: *mut c_ulonglong,
) -> Ret {
    unsafe { nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: Handle,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> Ret {
    with_gpu(device, Some(Feature::Ecc), |gpu, _| {
        let value = match (error_type, counter_type) {
            (0, 0) => gpu.ecc_corrected_volatile,
            (1, 0) => gpu.ecc_uncorrected_volatile,
            (0, 1) => gpu.ecc_corrected_aggregate,
            (1, 1) => gpu.ecc_uncorrected_aggregate,
            _ => return Err(ERROR_INVALID_ARGUMENT),
        };
        unsafe { put(count, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieReplayCounter(device: Handle, value: *mut c_uint) -> Ret {
    with_gpu(device, Some(Feature::PcieReplay), |gpu, _| unsafe {
        put(value, gpu.pcie_replays)
    })
}

/// Count-then-fill: with too small a buffer (or none) it reports the count
/// and INSUFFICIENT_SIZE, as NVML does.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Handle,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    with_state(|state| {
        if count.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let (gpu, only_instance) = match resolve_handle(state, device)? {
            Target::Gpu(_, gpu) => (gpu, None),
            Target::Mig(gpu, mig) => (gpu, Some(mig.gpu_instance_id)),
        };
        if !gpu.supports(Feature::Processes) {
            return Err(ERROR_NOT_SUPPORTED);
        }
        let entries: Vec<ProcessInfo> = gpu
            .processes
            .iter()
            .filter(|p| only_instance.is_none() || p.gpu_instance_id == only_instance)
            .map(|p| ProcessInfo {
                pid: p.pid,
                used_gpu_memory: p.used_memory_bytes.unwrap_or(VALUE_NOT_AVAILABLE),
                gpu_instance_id: p.gpu_instance_id.unwrap_or(NO_INSTANCE),
                compute_instance_id: p.compute_instance_id.unwrap_or(NO_INSTANCE),
            })
            .collect();
        // SAFETY: `count` is non-null and points at the caller's capacity.
        let capacity = unsafe { count.read() } as usize;
        if entries.is_empty() {
            return unsafe { put(count, 0) };
        }
        if infos.is_null() || capacity < entries.len() {
            unsafe { put(count, entries.len() as c_uint)? };
            return Err(ERROR_INSUFFICIENT_SIZE);
        }
        for (i, entry) in entries.iter().enumerate() {
            // SAFETY: i < entries.len() <= capacity elements at `infos`.
            unsafe { infos.add(i).write(*entry) };
        }
        unsafe { put(count, entries.len() as c_uint) }
    })
}

// ---------------------------------------------------------------------- MIG

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Handle,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    with_gpu(device, Some(Feature::Mig), |gpu, _| {
        let mode = c_uint::from(!gpu.mig.is_empty());
        unsafe {
            put(current, mode)?;
            put(pending, mode)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: Handle, count: *mut c_uint) -> Ret {
    with_gpu(device, Some(Feature::Mig), |gpu, _| {
        let slots = if gpu.mig.is_empty() {
            0
        } else {
            MIG_SLOTS.max(gpu.mig.len() as c_uint)
        };
        unsafe { put(count, slots) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: Handle,
    index: c_uint,
    mig_device: *mut Handle,
) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Gpu(_, gpu) if gpu.mig.is_empty() || !gpu.supports(Feature::Mig) => {
            Err(ERROR_NOT_SUPPORTED)
        }
        Target::Gpu(position, gpu) => {
            let slot = index as usize;
            if slot < gpu.mig.len() {
                unsafe { put(mig_device, mig_handle(position, slot)) }
            } else if index < MIG_SLOTS {
                Err(ERROR_NOT_FOUND)
            } else {
                Err(ERROR_INVALID_ARGUMENT)
            }
        }
        Target::Mig(..) => Err(ERROR_INVALID_ARGUMENT),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: Handle, is_mig: *mut c_uint) -> Ret {
    with_state(|state| {
        let value = matches!(resolve_handle(state, device)?, Target::Mig(..));
        unsafe { put(is_mig, c_uint::from(value)) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(device: Handle, id: *mut c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Mig(_, mig) => unsafe { put(id, mig.gpu_instance_id) },
        Target::Gpu(..) => Err(ERROR_INVALID_ARGUMENT),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(device: Handle, id: *mut c_uint) -> Ret {
    with_state(|state| match resolve_handle(state, device)? {
        Target::Mig(_, mig) => unsafe { put(id, mig.compute_instance_id) },
        Target::Gpu(..) => Err(ERROR_INVALID_ARGUMENT),
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: Handle,
    device: *mut Handle,
) -> Ret {
    with_state(|state| {
        resolve_handle(state, mig_device)?;
        let raw = mig_device.addr();
        if raw >> MIG_SHIFT == 0 {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let position = (raw & ((1 << MIG_SHIFT) - 1)) - 1;
        unsafe { put(device, gpu_handle(position)) }
    })
}

// ------------------------------------------------------------------- events

#[cfg(not(feature = "missing-symbols"))]
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut Handle) -> Ret {
    with_state(|state| {
        let id = state.next_event_set;
        unsafe { put(set, std::ptr::without_provenance_mut(EVENT_SET_BASE + id))? };
        state.next_event_set += 1;
        state.event_sets.insert(id, EventSet::default());
        Ok(SUCCESS)
    })
}

fn event_set_id(set: Handle) -> Result<usize, Ret> {
    set.addr()
        .checked_sub(EVENT_SET_BASE)
        .filter(|id| *id > 0)
        .ok_or(ERROR_INVALID_ARGUMENT)
}

#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: Handle,
    event_types: c_ulonglong,
    set: Handle,
) -> Ret {
    with_state(|state| {
        let id = event_set_id(set)?;
        let uuid = match resolve_handle(state, device)? {
            Target::Gpu(_, gpu) if !gpu.supports(Feature::Events) => {
                return Err(ERROR_NOT_SUPPORTED)
            }
            Target::Gpu(_, gpu) => gpu.uuid.clone(),
            Target::Mig(..) => return Err(ERROR_NOT_SUPPORTED),
        };
        let already = state.delivered_anywhere.get(&uuid).copied().unwrap_or(0);
        let entry = state
            .event_sets
            .get_mut(&id)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        if event_types & EVENT_XID != 0 && !entry.xid_gpus.contains(&uuid) {
            entry.delivered.insert(uuid.clone(), already);
            entry.xid_gpus.push(uuid);
        }
        Ok(SUCCESS)
    })
}

/// The next undelivered, due XID event of a set: (GPU position, xid).
fn next_event(state: &mut Loaded, id: usize) -> Result<Option<(usize, u64)>, Ret> {
    let elapsed = state.elapsed_s();
    let set = state
        .event_sets
        .get_mut(&id)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    for (position, gpu) in state
        .scenario
        .gpus
        .iter()
        .filter(|g| !g.removed)
        .enumerate()
    {
        if !set.xid_gpus.contains(&gpu.uuid) {
            continue;
        }
        let done = set.delivered.entry(gpu.uuid.clone()).or_insert(0);
        if let Some(event) = gpu.xid_events.get(*done) {
            if event.after_s <= elapsed {
                *done += 1;
                let global = state
                    .delivered_anywhere
                    .entry(gpu.uuid.clone())
                    .or_insert(0);
                *global = (*global).max(*done);
                return Ok(Some((position, event.xid)));
            }
        }
    }
    Ok(None)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: Handle,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    if data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let Ok(id) = event_set_id(set) else {
        return ERROR_INVALID_ARGUMENT;
    };
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let outcome = {
            let mut guard = lock();
            match guard.as_mut() {
                Some(state) if state.init_count > 0 => {
                    state.refresh();
                    next_event(state, id)
                }
                _ => Err(ERROR_UNINITIALIZED),
            }
        };
        match outcome {
            Err(e) => return e,
            Ok(Some((position, xid))) => {
                let event = EventData {
                    device: gpu_handle(position),
                    event_type: EVENT_XID,
                    event_data: xid,
                    gpu_instance_id: NO_INSTANCE,
                    compute_instance_id: NO_INSTANCE,
                };
                return code(unsafe { put(data, event) });
            }
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    return ERROR_TIMEOUT;
                }
                std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
            }
        }
    }
}

#[no_mangle]
pub extern "C" fn nvmlEventSetFree(set: Handle) -> Ret {
    with_state(|state| {
        let id = event_set_id(set)?;
        state
            .event_sets
            .remove(&id)
            .map(|_| SUCCESS)
            .ok_or(ERROR_INVALID_ARGUMENT)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_id_parts_are_hex() {
        assert_eq!(parse_bus_id("00000000:1A:00.0"), (0, 0x1a, 0));
        assert_eq!(parse_bus_id("00000001:17:03.1"), (1, 0x17, 3));
    }

    #[test]
    fn strings_must_fit_with_their_terminator() {
        let mut buf = [1 as c_char; 4];
        assert_eq!(
            unsafe { put_str(buf.as_mut_ptr(), 4, "abcd") },
            Err(ERROR_INSUFFICIENT_SIZE)
        );
        assert_eq!(unsafe { put_str(buf.as_mut_ptr(), 4, "abc") }, Ok(SUCCESS));
        assert_eq!(buf, [97, 98, 99, 0]);
        assert_eq!(
            unsafe { put_str(std::ptr::null_mut(), 4, "a") },
            Err(ERROR_INVALID_ARGUMENT)
        );
    }

    #[test]
    fn handles_round_trip() {
        assert_eq!(gpu_handle(0).addr(), 1);
        assert_eq!(mig_handle(2, 0).addr(), 3 | (1 << MIG_SHIFT));
        assert!(event_set_id(std::ptr::without_provenance_mut(EVENT_SET_BASE + 3)).is_ok());
        assert!(event_set_id(gpu_handle(0)).is_err());
    }

    fn loaded(scenario: Scenario) -> Loaded {
        Loaded {
            source: Source::Synthetic,
            started: Instant::now(),
            applied_steps: 0,
            scenario,
            init_count: 1,
            event_sets: HashMap::new(),
            next_event_set: 1,
            delivered_anywhere: HashMap::new(),
        }
    }

    fn register(state: &mut Loaded, id: usize, uuid: &str) {
        let already = state.delivered_anywhere.get(uuid).copied().unwrap_or(0);
        let set = state.event_sets.entry(id).or_default();
        set.delivered.insert(uuid.to_string(), already);
        set.xid_gpus.push(uuid.to_string());
    }

    #[test]
    fn xids_go_once_to_each_set_and_not_again_to_later_sets() {
        let mut scenario = scenario::synthetic(2);
        scenario.gpus[1].xid_events = vec![
            scenario::XidSpec {
                xid: 79,
                after_s: 0.0,
            },
            scenario::XidSpec {
                xid: 48,
                after_s: 3600.0,
            },
        ];
        let uuid = scenario.gpus[1].uuid.clone();
        let mut state = loaded(scenario);
        register(&mut state, 1, &uuid);
        register(&mut state, 2, &uuid);
        assert_eq!(next_event(&mut state, 1), Ok(Some((1, 79))));
        assert_eq!(next_event(&mut state, 2), Ok(Some((1, 79))));
        // Not due yet.
        assert_eq!(next_event(&mut state, 1), Ok(None));
        // A set registered after delivery (re-registration after a loss)
        // does not see the old event again.
        register(&mut state, 3, &uuid);
        assert_eq!(next_event(&mut state, 3), Ok(None));
        assert_eq!(next_event(&mut state, 9), Err(ERROR_INVALID_ARGUMENT));
    }

    #[test]
    fn lost_gpus_answer_gpu_is_lost_and_removed_ones_vanish() {
        let mut scenario = scenario::synthetic(3);
        scenario.gpus[0].removed = true;
        scenario.gpus[2].lost = true;
        let state = loaded(scenario);
        assert_eq!(state.visible().count(), 2);
        assert!(matches!(
            resolve_handle(&state, gpu_handle(0)),
            Ok(Target::Gpu(0, _))
        ));
        assert!(matches!(
            resolve_handle(&state, gpu_handle(1)),
            Err(ERROR_GPU_IS_LOST)
        ));
        assert!(matches!(
            resolve_handle(&state, gpu_handle(2)),
            Err(ERROR_INVALID_ARGUMENT)
        ));
        assert!(matches!(
            resolve_handle(&state, mig_handle(0, 0)),
            Err(ERROR_INVALID_ARGUMENT)
        ));
    }

    #[test]
    fn memory_v2_version_matches_nvml_macro() {
        // sizeof(nvmlMemory_v2_t) is 40 on LP64; version 2 in the top byte.
        assert_eq!(MEMORY_V2_VERSION, 40 | (2 << 24));
    }
}
