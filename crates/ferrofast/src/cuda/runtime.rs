//! Loading the CUDA libraries, devices (one context each) and streams.
//!
//! cudarc panics when `libcuda` or `libnvrtc` cannot be loaded, and when a symbol is missing.
//! Every entry point here therefore probes for the library first, looking where cudarc looks
//! (the dynamic loader's path) and then in the usual install folders, and runs the first
//! calls into a library under `catch_unwind`. A missing library becomes
//! [`Error::CudaUnavailable`] naming what was searched; driver failures become
//! [`Error::OutOfMemory`], [`Error::Device`] or [`Error::Cuda`].

use crate::error::{Error, Result};
use crate::Device;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, DriverError};
use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

// ----- library probing ----------------------------------------------------------------------

/// A shared library cudarc loads by name, and where else to look for it.
struct LibrarySpec {
    /// What the library is, for messages.
    what: &'static str,
    /// The base name cudarc searches for (`cuda` -> `libcuda.so`, `libcuda.so.1`, ...).
    cudarc_name: &'static str,
    /// Environment variable naming the library file explicitly.
    env_var: &'static str,
    /// File names tried in the extra folders, most wanted first. Each one's soname is among
    /// cudarc's candidates, so once loaded here cudarc's own load finds it.
    file_names: &'static [&'static str],
    /// Prefixes of libraries that the library loads by name at run time, to be loaded first
    /// from the folder it was found in.
    companions: &'static [&'static str],
    /// Extra folders to search.
    folders: fn() -> Vec<PathBuf>,
    /// True when cudarc can load the library from the loader's path.
    cudarc_present: fn() -> bool,
}

const DRIVER_LIB: LibrarySpec = LibrarySpec {
    what: "the CUDA driver library (libcuda)",
    cudarc_name: "cuda",
    env_var: "FERROFAST_LIBCUDA",
    file_names: &["libcuda.so.1", "libcuda.so"],
    companions: &[],
    folders: driver_folders,
    cudarc_present: driver_present,
};

const NVRTC_LIB: LibrarySpec = LibrarySpec {
    what: "the NVRTC runtime compiler library (libnvrtc)",
    cudarc_name: "nvrtc",
    env_var: "FERROFAST_LIBNVRTC",
    file_names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
    // libnvrtc dlopens its builtins library by soname; outside the loader's path it is found
    // only if it is already loaded.
    companions: &["libnvrtc-builtins.so."],
    folders: nvrtc_folders,
    cudarc_present: nvrtc_present,
};

#[cfg(not(feature = "cuda-linked"))]
fn driver_present() -> bool {
    // SAFETY: only tries to dlopen candidate names and closes them again.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(not(feature = "cuda-linked"))]
fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The file names cudarc tries for a library.
#[cfg(not(feature = "cuda-linked"))]
fn lib_name_candidates(name: &str) -> Vec<String> {
    cudarc::get_lib_name_candidates(name)
}

// With `cuda-linked`, cudarc is linked against the libraries (candle's `cuda` feature links
// it so): the process started, so the loader found them.
#[cfg(feature = "cuda-linked")]
fn driver_present() -> bool {
    true
}

#[cfg(feature = "cuda-linked")]
fn nvrtc_present() -> bool {
    true
}

#[cfg(feature = "cuda-linked")]
fn lib_name_candidates(name: &str) -> Vec<String> {
    vec![format!("lib{name}.so")]
}

fn driver_folders() -> Vec<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/lib/wsl/lib",
    ]
    .iter()
    .map(PathBuf::from)
    .collect()
}

fn nvrtc_folders() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for var in [
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "CUDA_TOOLKIT_ROOT_DIR",
    ] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            out.push(root.join("lib64"));
            out.push(root.join("lib"));
            out.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    out.push(PathBuf::from("/usr/local/cuda/lib64"));
    out.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    out.push(PathBuf::from("/opt/cuda/lib64"));
    // The pip wheels: `nvidia-cuda-nvrtc` 13.x puts the library in nvidia/cu13/lib, the 12.x
    // wheels in nvidia/cuda_nvrtc/lib.
    for site in python_site_folders() {
        out.push(site.join("nvidia/cu13/lib"));
        out.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    out
}

/// Python `site-packages` / `dist-packages` folders of the active virtual environment, the
/// user and the system, found by listing `lib/python3*` folders (no Python is run).
pub(crate) fn python_site_folders() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(venv));
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.push(PathBuf::from("/usr/local"));
    prefixes.push(PathBuf::from("/usr"));
    let mut out = Vec::new();
    for prefix in prefixes {
        let lib = prefix.join("lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("python3") {
                out.push(entry.path().join("site-packages"));
                out.push(entry.path().join("dist-packages"));
            }
        }
    }
    out
}

/// Libraries this module opened from an explicit path. Kept open for the life of the process
/// so cudarc's later load by soname finds them.
static OPENED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

fn open_path(path: &Path) -> bool {
    // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            if let Ok(mut opened) = OPENED.lock() {
                opened.push(lib);
            }
            true
        }
        Err(_) => false,
    }
}

/// Opens the libraries in `folder` whose names start with one of `prefixes` (skipping the
/// `.alt` variants some wheels ship beside them).
fn open_companions(folder: &Path, prefixes: &[&str]) {
    if prefixes.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p)) && !name.contains(".alt.") {
            open_path(&entry.path());
        }
    }
}

/// Makes `spec`'s library loadable by cudarc, or says what was searched.
fn probe(spec: &LibrarySpec) -> std::result::Result<(), String> {
    let present = spec.cudarc_present;
    let explicit = std::env::var_os(spec.env_var);
    if let Some(path) = &explicit {
        if open_path(Path::new(path)) && present() {
            return Ok(());
        }
    }
    if present() {
        return Ok(());
    }
    let folders = (spec.folders)();
    for folder in &folders {
        for name in spec.file_names {
            let path = folder.join(name);
            if path.exists() {
                open_companions(folder, spec.companions);
                if open_path(&path) && present() {
                    return Ok(());
                }
            }
        }
    }
    let mut names = lib_name_candidates(spec.cudarc_name);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let searched: Vec<String> = folders
        .iter()
        .filter(|f| f.is_dir())
        .map(|f| f.display().to_string())
        .collect();
    let explicit_note = match explicit {
        Some(p) => format!(
            "; {}={} could not be loaded",
            spec.env_var,
            p.to_string_lossy()
        ),
        None => String::new(),
    };
    Err(format!(
        "{} was not found: tried {} on the dynamic loader's path (LD_LIBRARY_PATH={}), then {} \
         in {}{}. Install the CUDA driver / toolkit, add the folder holding the library to \
         LD_LIBRARY_PATH, or set {} to the library file.",
        spec.what,
        names.join(", "),
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
        spec.file_names.join(", "),
        if searched.is_empty() {
            "no existing install folders".to_string()
        } else {
            searched.join(", ")
        },
        explicit_note,
        spec.env_var,
    ))
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol, say) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::CudaUnavailable(format!("{what}: {msg}")))
        }
    }
}

/// Checks once that libnvrtc can be loaded.
pub(crate) fn nvrtc_loaded() -> Result<()> {
    static NVRTC: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    NVRTC
        .get_or_init(|| probe(&NVRTC_LIB))
        .clone()
        .map_err(Error::CudaUnavailable)
}

/// Loads libcuda, initialises the driver and counts devices, once.
fn driver() -> Result<usize> {
    static DRIVER: OnceLock<Result<usize>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            probe(&DRIVER_LIB).map_err(Error::CudaUnavailable)?;
            guarded("initialising the CUDA driver", || {
                cudarc::driver::result::init().map_err(|e| match e.0 {
                    sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::CudaUnavailable(
                        "the CUDA driver is installed but found no CUDA device".to_string(),
                    ),
                    _ => driver_error("cuInit", e),
                })?;
                let n = cudarc::driver::result::device::get_count()
                    .map_err(|e| driver_error("cuDeviceGetCount", e))?;
                Ok(n.max(0) as usize)
            })
        })
        .clone()
}

/// Turns a driver error into the crate's error, naming the call that failed.
pub(crate) fn driver_error(what: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("CUresult {}", e.0 as u32));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match e.0 {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            Error::OutOfMemory(format!("{what}: the GPU is out of memory ({name}: {text})"))
        }
        sys::CUresult::CUDA_ERROR_INVALID_DEVICE | sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            Error::Device(format!("{what}: {name}: {text}"))
        }
        _ => Error::Cuda(format!("{what}: {name}: {text}")),
    }
}

/// Number of CUDA devices, or the reason there are none to use.
pub(crate) fn device_count() -> Result<usize> {
    driver()
}

// ----- devices ------------------------------------------------------------------------------

/// One CUDA device: its (primary) context, default stream, properties and loaded kernels.
pub(crate) struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    default_stream: Stream,
    compute_capability: (i32, i32),
    sm_count: u32,
    /// The most dynamic shared memory a block may opt in to, in bytes.
    max_shared_optin: usize,
    /// The device's default memory pool, which stream-ordered allocations draw from (`None`
    /// where the device has no memory pools). Stored as an address: the handle is only
    /// passed back to the driver.
    pool: Option<usize>,
    /// Kernels loaded into this context, by cache key (see `jit`).
    pub(crate) functions: Mutex<HashMap<String, CudaFunction>>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaDevice(cuda:{}, sm_{}{})",
            self.ordinal, self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl CudaDevice {
    /// The device ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The context (shared by all of ferrofast's work on this device).
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream ops run on unless told otherwise.
    pub(crate) fn default_stream(&self) -> &Stream {
        &self.default_stream
    }

    /// NVRTC's name for this device's exact architecture, e.g. `sm_90`.
    pub(crate) fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Whether kernels may run in thread-block clusters (compute capability 9.0 and later).
    pub(crate) fn has_clusters(&self) -> bool {
        self.compute_capability.0 >= 9
    }

    /// Number of streaming multiprocessors.
    pub(crate) fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub(crate) fn max_shared_optin(&self) -> usize {
        self.max_shared_optin
    }

    /// Returns the memory the default pool holds beyond what live allocations use to the
    /// driver, after waiting for all work on the device (frees are stream-ordered).
    ///
    /// # Errors
    /// Driver errors from the synchronisation or the trim.
    pub(crate) fn release_cached_memory(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| driver_error(&format!("synchronising cuda:{}", self.ordinal), e))?;
        if let Some(pool) = self.pool {
            self.ctx
                .bind_to_thread()
                .map_err(|e| driver_error("binding the CUDA context", e))?;
            // SAFETY: `pool` is the default pool of this device, which lives as long as the
            // process.
            unsafe { sys::cuMemPoolTrimTo(pool as sys::CUmemoryPool, 0) }
                .result()
                .map_err(|e| driver_error("trimming the GPU memory pool", e))?;
        }
        self.check_recorded_error()
    }

    /// Reports an error the driver recorded asynchronously (in a destructor, say).
    pub(crate) fn check_recorded_error(&self) -> Result<()> {
        self.ctx
            .check_err()
            .map_err(|e| driver_error("an earlier asynchronous CUDA operation", e))
    }
}

/// The device for `ordinal`, creating its context on first use.
///
/// # Errors
/// `CudaUnavailable` without a driver or device, `Device` for an ordinal that does not
/// exist, driver errors while creating the context.
pub(crate) fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let count = driver()?;
    if ordinal >= count {
        return Err(Error::Device(format!(
            "cuda:{ordinal} does not exist: {count} CUDA device(s) found"
        )));
    }
    let devices = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut devices = devices
        .lock()
        .map_err(|_| Error::Cuda("the CUDA device table was poisoned by a panic".into()))?;
    if let Some(d) = devices.get(&ordinal) {
        return Ok(Arc::clone(d));
    }
    let dev = guarded("creating a CUDA context", || {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(&format!("creating the context of cuda:{ordinal}"), e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_error("reading the compute capability", e))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("reading the multiprocessor count", e))?;
        let max_shared_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| driver_error("reading the shared memory per block", e))?;
        let pool = keep_freed_memory(&ctx);
        let default_stream = Stream {
            ordinal,
            inner: ctx.default_stream(),
        };
        Ok(Arc::new(CudaDevice {
            ordinal,
            ctx,
            default_stream,
            compute_capability,
            sm_count: sm_count.max(1) as u32,
            max_shared_optin: usize::try_from(max_shared_optin).unwrap_or(0),
            pool,
            functions: Mutex::new(HashMap::new()),
        }))
    })?;
    devices.insert(ordinal, Arc::clone(&dev));
    Ok(dev)
}

/// Makes the device's default memory pool keep freed memory for reuse instead of returning
/// it to the driver at every synchronisation (the driver's default release threshold is 0,
/// which makes the next allocation after a sync map fresh pages). Returns the pool, or `None`
/// where the device has no memory pools or the driver refuses either step: the pool is an
/// optimisation, and a device without it still works (allocations then behave as the
/// driver's defaults make them). [`CudaDevice::release_cached_memory`] gives the memory back
/// on request, and an allocation that runs out of memory does so before retrying.
fn keep_freed_memory(ctx: &CudaContext) -> Option<usize> {
    let supported = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .ok()?;
    if supported == 0 {
        return None;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle comes from a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .ok()?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to a cuuint64_t.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .ok()?;
    Some(pool as usize)
}

/// The CUDA device behind `device`, or an error for the CPU.
pub(crate) fn cuda_device(device: &Device) -> Result<Arc<CudaDevice>> {
    match device {
        Device::Cuda(i) => self::device(*i),
        Device::Cpu => Err(Error::Device(
            "expected a CUDA device but got the CPU".to_string(),
        )),
    }
}

// ----- streams ------------------------------------------------------------------------------

/// A queue of GPU work on one CUDA device. Work on one stream runs in order; work on
/// different streams may overlap.
///
/// Every array on a GPU remembers the stream that produced it, and ops on it run on that
/// stream. Reading an array produced on one stream from another is ordered correctly: the
/// reader waits for the writer (cudarc records an event per buffer once a device has more
/// than its default stream). [`Device::default_stream`] is where uploads and ops go unless a
/// stream is named; [`Stream::new`] makes another.
///
/// Cloning a `Stream` gives another handle to the same stream; the stream is destroyed when
/// the last handle and the last array produced on it are gone.
#[derive(Clone)]
pub struct Stream {
    ordinal: usize,
    inner: Arc<CudaStream>,
}

impl Stream {
    /// Creates a new stream on a CUDA device. It does not synchronise with the device's
    /// default stream except where arrays pass between them.
    ///
    /// # Errors
    /// `Error::Device` for the CPU or a missing device; `Error::CudaUnavailable` without a
    /// driver; driver errors.
    pub fn new(device: &Device) -> Result<Stream> {
        let dev = cuda_device(device)?;
        let inner = guarded("creating a CUDA stream", || {
            dev.context()
                .new_stream()
                .map_err(|e| driver_error("creating a CUDA stream", e))
        })?;
        Ok(Stream {
            ordinal: dev.ordinal(),
            inner,
        })
    }

    /// The device's default stream (the one [`Array::to_device`](crate::Array::to_device)
    /// uploads on).
    ///
    /// # Errors
    /// As [`Stream::new`].
    pub fn default_for(device: &Device) -> Result<Stream> {
        Ok(cuda_device(device)?.default_stream().clone())
    }

    /// A stream owned by another library (a `CUstream` / `cudaStream_t`: PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`, CuPy's `Stream.ptr`, a DLPack consumer's
    /// stream), so ferrofast's work and buffers go where the caller's work goes, without
    /// synchronising. The null handle is the device's legacy default stream; `1`
    /// (`CU_STREAM_LEGACY`) and `2` (`CU_STREAM_PER_THREAD`) are the driver's special handles.
    /// ferrofast never destroys it.
    ///
    /// # Safety
    /// `raw` must be a stream of `device`'s primary context (the context PyTorch, CuPy and
    /// JAX use), and it must stay alive while this `Stream`, any clone of it or any array
    /// produced on it exists (buffers allocated on a stream are freed on it).
    ///
    /// # Errors
    /// `Error::Device` for the CPU or a missing device; `Error::CudaUnavailable` without a
    /// driver.
    pub unsafe fn from_raw(device: &Device, raw: *mut std::ffi::c_void) -> Result<Stream> {
        let dev = cuda_device(device)?;
        // SAFETY: the caller's contract: `raw` is a live stream of this (primary) context.
        let inner = unsafe { dev.context().wrap_borrowed_stream(raw.cast()) };
        Ok(Stream {
            ordinal: dev.ordinal(),
            inner,
        })
    }

    /// The driver's handle of this stream (`CUstream`), for handing to another library. It
    /// stays valid while this `Stream` (or a clone, or an array produced on it) lives.
    pub fn as_raw(&self) -> *mut std::ffi::c_void {
        self.inner.cu_stream().cast()
    }

    /// Makes work queued on this stream from now on wait for the work queued on `other` so
    /// far (an event recorded on `other`; the host does not wait). A no-op when both are the
    /// same stream.
    ///
    /// # Errors
    /// `Error::Device` when the streams are on different devices; driver errors.
    pub fn wait_for(&self, other: &Stream) -> Result<()> {
        if self == other {
            return Ok(());
        }
        if self.ordinal != other.ordinal {
            return Err(Error::Device(format!(
                "a stream of cuda:{} cannot wait for one of cuda:{}",
                self.ordinal, other.ordinal
            )));
        }
        guarded("ordering two CUDA streams", || {
            self.inner
                .join(&other.inner)
                .map_err(|e| driver_error("ordering two CUDA streams", e))
        })
    }

    /// The device this stream belongs to.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Blocks until all work queued on this stream has finished.
    ///
    /// # Errors
    /// The error of any failed asynchronous work on the stream (a kernel fault, say).
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .synchronize()
            .map_err(|e| driver_error("synchronising a CUDA stream", e))?;
        self.inner
            .context()
            .check_err()
            .map_err(|e| driver_error("an earlier asynchronous CUDA operation", e))
    }

    /// The device ordinal.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The cudarc stream.
    pub(crate) fn cuda(&self) -> &Arc<CudaStream> {
        &self.inner
    }
}

impl PartialEq for Stream {
    fn eq(&self, other: &Stream) -> bool {
        self.ordinal == other.ordinal && self.inner.cu_stream() == other.inner.cu_stream()
    }
}

impl Eq for Stream {}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Stream(cuda:{}, {:p})",
            self.ordinal,
            self.inner.cu_stream()
        )
    }
}

/// Runs a kernel launch `f` under [`guarded`], turning a driver error into an `Error` that
/// names `what` (the kernel).
pub(crate) fn launch(
    what: &str,
    f: impl FnOnce() -> std::result::Result<(), DriverError>,
) -> Result<()> {
    guarded(what, || f().map_err(|e| driver_error(what, e)))
}

/// Launches the kernel of `builder` (its arguments pushed) with `cfg` under [`launch`]; a
/// failure names it as `launching {name}`.
///
/// # Safety
/// As cudarc's `LaunchArgs::launch`: the pushed arguments match the kernel's parameters in
/// order and type, and with `cfg` every access the kernel makes stays inside the memory it
/// is given (each caller says why).
pub(crate) unsafe fn launch_kernel(
    name: &str,
    builder: &mut cudarc::driver::LaunchArgs<'_>,
    cfg: cudarc::driver::LaunchConfig,
) -> Result<()> {
    launch(&format!("launching {name}"), || {
        // SAFETY: the caller's contract.
        unsafe { builder.launch(cfg) }.map(|_| ())
    })
}

/// Lets `func` use `bytes` of dynamic shared memory when that is past the 48 KiB every
/// kernel may use without asking (checked by the driver against the device); `what` names
/// the kernel in the error.
///
/// # Errors
/// `Error::Cuda` when the device has less shared memory per block.
pub(crate) fn allow_dynamic_shared_memory(
    func: &cudarc::driver::CudaFunction,
    bytes: usize,
    what: &str,
) -> Result<()> {
    if bytes <= 48 * 1024 {
        return Ok(());
    }
    guarded(&format!("setting {what}'s shared memory size"), || {
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            i32::try_from(bytes).unwrap_or(i32::MAX),
        )
        .map_err(|e| driver_error(&format!("allowing {what} {bytes} bytes of shared memory"), e))
    })
}

/// A one-dimensional launch: `blocks` blocks of `threads` threads with `smem` bytes of
/// dynamic shared memory each.
pub(crate) fn grid_1d(blocks: u32, threads: u32, smem: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Waits for all work on a CUDA device.
pub(crate) fn synchronize_device(ordinal: usize) -> Result<()> {
    let dev = device(ordinal)?;
    dev.context()
        .synchronize()
        .map_err(|e| driver_error(&format!("synchronising cuda:{ordinal}"), e))?;
    dev.check_recorded_error()
}

/// Blocks of `name` that fit on the whole GPU at once, asked of the driver once per device
/// and kernel.
pub(crate) fn resident_blocks(
    device: &CudaDevice,
    name: &str,
    func: &CudaFunction,
    threads: u32,
    smem: usize,
) -> Result<u64> {
    type Memo = std::sync::Mutex<std::collections::HashMap<(usize, String), u64>>;
    static MEMO: std::sync::OnceLock<Memo> = std::sync::OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let key = (device.ordinal(), format!("{name} {smem}"));
    if let Some(&n) = memo.lock().ok().and_then(|m| m.get(&key).copied()).as_ref() {
        return Ok(n);
    }
    let per_sm = guarded("reading a kernel's occupancy", || {
        // The query needs the device's context current on this thread (a rayon worker, say).
        device
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the CUDA context", e))?;
        func.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .map_err(|e| driver_error("reading a kernel's occupancy", e))
    })?;
    let n = u64::from(per_sm.max(1)) * u64::from(device.sm_count());
    if let Ok(mut m) = memo.lock() {
        m.insert(key, n);
    }
    Ok(n)
}
