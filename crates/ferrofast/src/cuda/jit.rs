//! Run-time compilation of the built-in `.cu` kernels: NVRTC straight to CUBIN for the
//! device's exact architecture (never PTX: a newer NVRTC writes PTX an older driver rejects),
//! one module per kernel instantiation, cached in memory per device and on disk.
//!
//! Kernels are templates; a launcher names the instantiation it wants with an NVRTC name
//! expression (`rms_norm_rows<ff_f16, 2, true>`), and NVRTC reports the mangled name to load.
//!
//! Disk cache: one file per (NVRTC version, architecture, options, name expressions, source
//! hash) in `FERROFAST_CACHE_DIR`, else `$XDG_CACHE_HOME/ferrofast`, else
//! `~/.cache/ferrofast`. Each file repeats its full key and carries a checksum; a missing,
//! corrupt or unwritable cache only costs a compile.

use super::runtime::{driver_error, guarded, nvrtc_loaded, CudaDevice};
use crate::error::{Error, Result};
use crate::testing::KernelCheck;
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::sys as nvrtc;
use cudarc::nvrtc::Ptx;
use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

/// A built-in kernel source file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelFile {
    /// File name, for messages and NVRTC's program name.
    pub(crate) name: &'static str,
    /// CUDA C++ source.
    pub(crate) source: &'static str,
    /// The exact architecture the file is compiled for when it is not the device's own:
    /// `sm_90a` for kernels using instructions only the architecture-specific target has
    /// (wgmma, setmaxnreg). Its launcher runs it only on devices of that architecture.
    pub(crate) arch: Option<&'static str>,
}

impl KernelFile {
    /// A file compiled for the device's own architecture.
    pub(crate) const fn new(name: &'static str, source: &'static str) -> KernelFile {
        KernelFile {
            name,
            source,
            arch: None,
        }
    }

    /// A file compiled for exactly `arch` (e.g. `sm_90a`), run only on devices of it.
    pub(crate) const fn for_arch(
        name: &'static str,
        source: &'static str,
        arch: &'static str,
    ) -> KernelFile {
        KernelFile {
            name,
            source,
            arch: Some(arch),
        }
    }
}

/// A kernel file and every template instantiation its launcher can ask for: one entry of
/// the registry (`cuda::registry`) that the compile check loops over.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Registered {
    /// The `.cu` file.
    pub(crate) file: KernelFile,
    /// NVRTC name expressions of every instantiation a launch may use.
    pub(crate) variants: fn() -> Vec<String>,
}

/// The in-memory header every kernel file includes.
const PRELUDE_NAME: &str = "ferrofast_prelude.cuh";
const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// The in-memory header of the tensor-core attention kernels (`attn_prefill.cu`,
/// `attn_decode.cu`): PTX wrappers and per-tile flash-attention steps.
const MMA_NAME: &str = "ferrofast_mma.cuh";
const MMA: &str = include_str!("kernels/mma.cuh");

/// The in-memory header of every attention kernel: the mask encoding and `ff_attn_params`.
const ATTN_NAME: &str = "ferrofast_attn.cuh";
const ATTN: &str = include_str!("kernels/attn.cuh");

/// The in-memory header of the Hopper kernels (`attn_prefill_sm90.cu`): mbarrier, TMA and
/// wgmma wrappers.
const HOPPER_NAME: &str = "ferrofast_hopper.cuh";
const HOPPER: &str = include_str!("kernels/hopper.cuh");

/// The in-memory header of the attention backward kernels (`attn_backward_mma.cu`,
/// `attn_backward_sm90.cu`): probabilities, dS and accumulator stores.
const ATTN_BWD_NAME: &str = "ferrofast_attn_bwd.cuh";
const ATTN_BWD: &str = include_str!("kernels/attn_bwd.cuh");

/// Every in-memory header a built-in kernel file may include, as `(include name, text)`.
const HEADERS: [(&str, &str); 5] = [
    (PRELUDE_NAME, PRELUDE),
    (MMA_NAME, MMA),
    (ATTN_NAME, ATTN),
    (HOPPER_NAME, HOPPER),
    (ATTN_BWD_NAME, ATTN_BWD),
];

/// Bumped when the cache file layout or the compile options change meaning.
const CACHE_FORMAT: &[u8; 8] = b"FFCUBIN1";

/// A compiled module image and the mangled names of its requested instantiations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cubin {
    image: Vec<u8>,
    lowered: Vec<String>,
}

/// NVRTC's version `(major, minor)`.
///
/// # Errors
/// `Error::CudaUnavailable` when libnvrtc cannot be loaded (the message lists where it was
/// looked for).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    static VERSION: OnceLock<Result<(i32, i32)>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            nvrtc_loaded()?;
            guarded("querying the NVRTC version", || {
                let (mut major, mut minor) = (0, 0);
                // SAFETY: plain out-parameters.
                unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) }
                    .result()
                    .map_err(|e| Error::Compile(format!("nvrtcVersion failed: {e:?}")))?;
                Ok((major, minor))
            })
        })
        .clone()
}

fn options_for(arch: &str, extra: &[String]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        // Accurate division and square root: the norms' results are compared against f32
        // references at 1e-6.
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
    ];
    opts.extend(extra.iter().cloned());
    opts
}

/// Destroys an NVRTC program when dropped.
struct Program(nvrtc::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed only here.
        // A failure leaks the program's memory and nothing else.
        let _ = unsafe { nvrtc::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Compile(format!("NUL byte in NVRTC input {s:?}")))
}

/// Compiles `file` for `arch` (e.g. `sm_90`), instantiating each name expression.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc; `Error::Compile` with NVRTC's log when the
/// source does not compile.
pub(crate) fn compile(
    file: &KernelFile,
    names: &[String],
    extra_options: &[String],
    arch: &str,
) -> Result<Cubin> {
    nvrtc_loaded()?;
    let options = options_for(arch, extra_options);
    guarded("running NVRTC", || {
        compile_loaded(file, names, &options, arch)
    })
}

fn nvrtc_err(what: &str, program: &str, e: cudarc::nvrtc::result::NvrtcError) -> Error {
    Error::Compile(format!("{what} for {program} failed: {e:?}"))
}

fn compile_loaded(
    file: &KernelFile,
    names: &[String],
    options: &[String],
    arch: &str,
) -> Result<Cubin> {
    compile_program(file.name, file.source, &HEADERS, names, options, arch).map_err(|e| match e {
        CompileFailure::Log(log) => Error::Compile(format!(
            "NVRTC could not compile {} for {arch} with options [{}]:\n{}",
            file.name,
            options.join(" "),
            log.trim_end()
        )),
        CompileFailure::Other(e) => e,
    })
}

/// Why [`compile_program`] failed: the source itself (NVRTC's log), or anything else.
pub(crate) enum CompileFailure {
    /// NVRTC rejected the source; its log.
    Log(String),
    /// Any other failure, already an error.
    Other(Error),
}

impl From<Error> for CompileFailure {
    fn from(e: Error) -> Self {
        CompileFailure::Other(e)
    }
}

/// Compiles one program to CUBIN: `source` named `program` for messages, with in-memory
/// `headers` as `(include name, contents)`, instantiating each name expression. The
/// caller has checked that libnvrtc is loaded and passes the full option list.
fn compile_program(
    program: &str,
    source: &str,
    headers: &[(&str, &str)],
    names: &[String],
    options: &[String],
    arch: &str,
) -> std::result::Result<Cubin, CompileFailure> {
    let source_c = c_string(source)?;
    let program_name = c_string(program)?;
    let header_sources = headers
        .iter()
        .map(|(_, text)| c_string(text))
        .collect::<Result<Vec<_>>>()?;
    let header_names = headers
        .iter()
        .map(|(name, _)| c_string(name))
        .collect::<Result<Vec<_>>>()?;
    let header_ptrs: Vec<*const c_char> = header_sources.iter().map(|h| h.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
    let mut raw: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all strings are NUL-terminated and outlive the program (dropped at the end of
    // this function, after `prog`); the header arrays hold `headers.len()` entries each.
    unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut raw,
            source_c.as_ptr(),
            program_name.as_ptr(),
            headers.len() as i32,
            header_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| nvrtc_err("nvrtcCreateProgram", program, e))?;
    let prog = Program(raw);

    let c_names = names
        .iter()
        .map(|n| c_string(n))
        .collect::<Result<Vec<_>>>()?;
    for n in &c_names {
        // SAFETY: valid program and NUL-terminated expression.
        unsafe { nvrtc::nvrtcAddNameExpression(prog.0, n.as_ptr()) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcAddNameExpression", program, e))?;
    }
    let c_options = options
        .iter()
        .map(|o| c_string(o))
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: valid program; option pointers live until the call returns.
    let compiled = unsafe {
        nvrtc::nvrtcCompileProgram(prog.0, option_ptrs.len() as i32, option_ptrs.as_ptr())
    }
    .result();
    if let Err(e) = compiled {
        let log = program_log(&prog).unwrap_or_default();
        let log = if log.trim().is_empty() {
            format!("{e:?}")
        } else {
            log
        };
        return Err(CompileFailure::Log(log));
    }

    let mut lowered = Vec::with_capacity(names.len());
    for (n, c) in names.iter().zip(&c_names) {
        let mut ptr: *const c_char = std::ptr::null();
        // SAFETY: the expression was added before compiling; NVRTC owns the returned string
        // until the program is destroyed, and it is copied out at once.
        unsafe { nvrtc::nvrtcGetLoweredName(prog.0, c.as_ptr(), &mut ptr) }
            .result()
            .map_err(|e| nvrtc_err(&format!("nvrtcGetLoweredName({n})"), program, e))?;
        if ptr.is_null() {
            return Err(Error::Compile(format!(
                "NVRTC returned no lowered name for {n} in {program}"
            ))
            .into());
        }
        // SAFETY: non-null, NUL-terminated, owned by the live program.
        lowered.push(
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned(),
        );
    }

    let mut size = 0usize;
    // SAFETY: valid compiled program; plain out-parameter.
    unsafe { nvrtc::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| nvrtc_err("nvrtcGetCUBINSize", program, e))?;
    if size == 0 {
        return Err(Error::Compile(format!(
            "NVRTC produced no CUBIN for {program} ({arch}); the architecture must be a real \
             one such as sm_90, not compute_90"
        ))
        .into());
    }
    let mut image = vec![0u8; size];
    // SAFETY: `image` has exactly the size NVRTC reported.
    unsafe { nvrtc::nvrtcGetCUBIN(prog.0, image.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| nvrtc_err("nvrtcGetCUBIN", program, e))?;
    Ok(Cubin { image, lowered })
}

fn program_log(prog: &Program) -> Option<String> {
    let mut size = 0usize;
    // SAFETY: valid program; plain out-parameter.
    unsafe { nvrtc::nvrtcGetProgramLogSize(prog.0, &mut size) }
        .result()
        .ok()?;
    let mut log = vec![0u8; size.max(1)];
    // SAFETY: `log` has the size NVRTC reported.
    unsafe { nvrtc::nvrtcGetProgramLog(prog.0, log.as_mut_ptr().cast::<c_char>()) }
        .result()
        .ok()?;
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    Some(String::from_utf8_lossy(&log[..end]).into_owned())
}

// ----- caches -------------------------------------------------------------------------------

/// 128-bit FNV-1a: a stable hash (unlike std's hasher, not tied to the Rust version), so
/// cache keys stay valid across builds.
fn fnv1a128(parts: &[&[u8]]) -> u128 {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for part in parts {
        for &b in *part {
            h ^= b as u128;
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
        // Separate parts so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    h
}

/// Everything the compiled image depends on.
fn cache_key(file: &KernelFile, names: &[String], options: &[String], nvrtc: (i32, i32)) -> String {
    let mut parts: Vec<&[u8]> = HEADERS.iter().map(|(_, text)| text.as_bytes()).collect();
    parts.push(file.source.as_bytes());
    let source_hash = fnv1a128(&parts);
    format!(
        "nvrtc {}.{} | {} | {} | {} | {source_hash:032x}",
        nvrtc.0,
        nvrtc.1,
        options.join(" "),
        names.join("; "),
        file.name
    )
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FERROFAST_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("ferrofast"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("ferrofast"))
}

fn cache_path(key: &str) -> Option<PathBuf> {
    let h = fnv1a128(&[key.as_bytes()]);
    cache_dir().map(|d| d.join(format!("{h:032x}.cubin")))
}

fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Cache file: magic, key, lowered names, image, then a checksum of all that.
fn encode(key: &str, cubin: &Cubin) -> Vec<u8> {
    let mut out = Vec::with_capacity(cubin.image.len() + key.len() + 256);
    out.extend_from_slice(CACHE_FORMAT);
    push_bytes(&mut out, key.as_bytes());
    out.extend_from_slice(&(cubin.lowered.len() as u64).to_le_bytes());
    for name in &cubin.lowered {
        push_bytes(&mut out, name.as_bytes());
    }
    push_bytes(&mut out, &cubin.image);
    let sum = fnv1a128(&[&out]);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads length-prefixed fields back; any inconsistency gives `None`.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
}

fn decode(data: &[u8], key: &str) -> Option<Cubin> {
    let body_len = data.len().checked_sub(16)?;
    let (body, sum) = data.split_at(body_len);
    if fnv1a128(&[body]).to_le_bytes() != sum {
        return None;
    }
    let mut r = Reader { data: body };
    if r.take(CACHE_FORMAT.len())? != CACHE_FORMAT || r.bytes()? != key.as_bytes() {
        return None;
    }
    let count = usize::try_from(r.u64()?).ok()?;
    if count > 4096 {
        return None;
    }
    let mut lowered = Vec::with_capacity(count);
    for _ in 0..count {
        lowered.push(String::from_utf8(r.bytes()?.to_vec()).ok()?);
    }
    let image = r.bytes()?.to_vec();
    (r.data.is_empty() && !image.is_empty()).then_some(Cubin { image, lowered })
}

fn read_disk_cache(key: &str) -> Option<Cubin> {
    let data = std::fs::read(cache_path(key)?).ok()?;
    decode(&data, key)
}

/// Best effort: a cache that cannot be written is skipped silently.
fn write_disk_cache(key: &str, cubin: &Cubin) {
    let Some(path) = cache_path(key) else {
        return;
    };
    let Some(dir) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    // Write a private temporary file and rename it into place, so a concurrent reader never
    // sees a half-written file.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}.{nonce}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    if std::fs::write(&tmp, encode(key, cubin)).is_ok() && std::fs::rename(&tmp, &path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
}

/// The kernel `name_expr` (an instantiation of a template in `file`) loaded on `device`,
/// compiled on first use.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc, `Error::Compile` with NVRTC's log, driver
/// errors when the module cannot be loaded.
pub(crate) fn function(
    device: &CudaDevice,
    file: &KernelFile,
    name_expr: &str,
    extra_options: &[String],
) -> Result<CudaFunction> {
    // In memory a kernel is identified by file, instantiation and options alone: the sources
    // are compiled into this binary and the device fixes the architecture. Hashing the source
    // (needed only for the disk cache) costs tens of microseconds, too much for every launch.
    let memo_key = format!(
        "{} | {} | {}",
        file.name,
        name_expr,
        extra_options.join(" ")
    );
    memoized(device, memo_key, || {
        let arch = file.arch.map_or_else(|| device.arch(), str::to_string);
        let options = options_for(&arch, extra_options);
        let names = [name_expr.to_string()];
        let key = cache_key(file, &names, &options, nvrtc_version()?);
        cached_load(device, file.name, &key, || {
            compile(file, &names, extra_options, &arch)
        })
    })
}

/// The function of the image under `key` in the disk cache, or of a fresh `compile` (written
/// to the cache), loaded on `device`. A cached image the driver rejects (written by a broken
/// build, say) is replaced by a fresh compile. `what` names the program in errors.
fn cached_load(
    device: &CudaDevice,
    what: &str,
    key: &str,
    compile: impl Fn() -> Result<Cubin>,
) -> Result<CudaFunction> {
    let fresh = || -> Result<Cubin> {
        let c = compile()?;
        write_disk_cache(key, &c);
        Ok(c)
    };
    match read_disk_cache(key) {
        Some(cubin) => match load_image(device, what, &cubin) {
            Ok(f) => Ok(f),
            Err(_) => load_image(device, what, &fresh()?),
        },
        None => load_image(device, what, &fresh()?),
    }
}

// ----- programs given at run time (custom kernels) -------------------------------------------

/// A CUDA program given at run time (a custom kernel's generated source): compiled through
/// the same NVRTC -> CUBIN path and caches as the built-in kernels.
///
/// In memory it is identified by a hash of its source and headers with its name expression
/// and options, so two programs whose kernels share a name never collide; on disk by that
/// and the architecture and NVRTC version.
pub(crate) struct SourceProgram<'a> {
    /// Program name, for NVRTC's messages (e.g. `custom_kernel_foo.cu`).
    pub(crate) name: &'a str,
    /// The complete CUDA C++ source.
    pub(crate) source: &'a str,
    /// In-memory headers as `(include name, contents)`.
    pub(crate) headers: &'a [(&'a str, &'a str)],
    /// The NVRTC name expression of the one kernel to load, e.g.
    /// `mlx::core::cu::custom_kernel_foo`.
    pub(crate) name_expr: &'a str,
    /// Options beyond the architecture and `-std=c++17` (include folders, math modes).
    pub(crate) options: &'a [String],
    /// The start of the error message when NVRTC rejects the source; its log follows.
    pub(crate) failure: &'a str,
}

impl SourceProgram<'_> {
    fn source_hash(&self) -> u128 {
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * self.headers.len() + 1);
        for (name, text) in self.headers {
            parts.push(name.as_bytes());
            parts.push(text.as_bytes());
        }
        parts.push(self.source.as_bytes());
        fnv1a128(&parts)
    }
}

/// A kernel compiled to CUBIN by [`compile_source`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CompiledSource {
    /// The CUBIN image.
    pub(crate) image: Vec<u8>,
    /// The kernel's mangled (lowered) name in the image.
    pub(crate) symbol: String,
}

/// Compiles `program` for `arch` without loading it (no GPU needed), bypassing the caches.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc; `Error::Compile` starting with
/// `program.failure` and carrying NVRTC's log when the source does not compile.
pub(crate) fn compile_source(program: &SourceProgram, arch: &str) -> Result<CompiledSource> {
    let cubin = compile_source_cubin(program, arch)?;
    let symbol = cubin
        .lowered
        .first()
        .cloned()
        .ok_or_else(|| Error::Compile(format!("no kernel name for {}", program.name)))?;
    Ok(CompiledSource {
        image: cubin.image,
        symbol,
    })
}

fn compile_source_cubin(program: &SourceProgram, arch: &str) -> Result<Cubin> {
    nvrtc_loaded()?;
    let options = options_for(arch, program.options);
    let names = [program.name_expr.to_string()];
    guarded("running NVRTC", || {
        compile_program(
            program.name,
            program.source,
            program.headers,
            &names,
            &options,
            arch,
        )
        .map_err(|e| match e {
            CompileFailure::Log(log) => {
                Error::Compile(format!("{}: {}", program.failure, log.trim_end()))
            }
            CompileFailure::Other(e) => e,
        })
    })
}

/// The kernel of `program` loaded on `device` for architecture `arch`, compiled on first
/// use (or read from the disk cache).
///
/// # Errors
/// As [`compile_source`]; driver errors when the module cannot be loaded.
pub(crate) fn source_function(
    device: &CudaDevice,
    program: &SourceProgram,
    arch: &str,
) -> Result<CudaFunction> {
    let hash = program.source_hash();
    let memo_key = format!(
        "source | {} | {} | {arch} | {hash:032x}",
        program.name_expr,
        program.options.join(" ")
    );
    memoized(device, memo_key, || {
        let options = options_for(arch, program.options);
        let version = nvrtc_version()?;
        let key = format!(
            "nvrtc {}.{} | {} | {} | {} | {hash:032x}",
            version.0,
            version.1,
            options.join(" "),
            program.name_expr,
            program.name
        );
        cached_load(device, program.name, &key, || {
            compile_source_cubin(program, arch)
        })
    })
}

fn load_image(device: &CudaDevice, what: &str, cubin: &Cubin) -> Result<CudaFunction> {
    let name = cubin
        .lowered
        .first()
        .ok_or_else(|| Error::Compile(format!("no kernel name for {what}")))?;
    guarded("loading a CUDA module", || {
        let module = device
            .context()
            .load_module(Ptx::from_binary(cubin.image.clone()))
            .map_err(|e| driver_error(&format!("loading the module of {what}"), e))?;
        module
            .load_function(name)
            .map_err(|e| driver_error(&format!("finding kernel {name} in {what}"), e))
    })
}

/// The kernel `symbol` of a precompiled module image (`image`: PTX text, CUBIN or fatbin)
/// loaded on `device`; modules are cached in memory by symbol and a hash of the image.
///
/// # Errors
/// `Error::InvalidArgument` when the symbol contains a NUL byte; driver errors (naming
/// `what`) when the driver rejects the image or finds no such symbol.
pub(crate) fn binary_function(
    device: &CudaDevice,
    what: &str,
    symbol: &str,
    image: &[u8],
) -> Result<CudaFunction> {
    if symbol.contains('\0') {
        return Err(Error::invalid(format!(
            "[{what}] The kernel name must not contain a NUL byte."
        )));
    }
    let memo_key = format!("binary | {symbol} | {:032x}", fnv1a128(&[image]));
    memoized(device, memo_key, || {
        let mut data = image.to_vec();
        // CUBIN (ELF) and fatbin images carry their size; PTX is text the driver reads up to a
        // NUL byte, which Python's `bytes` (and a Rust `&[u8]`) need not end with.
        let is_elf = data.starts_with(b"\x7fELF");
        let is_fatbin = data.starts_with(&[0x50, 0xed, 0x55, 0xba]);
        if !is_elf && !is_fatbin && data.last() != Some(&0) {
            data.push(0);
        }
        guarded("loading a CUDA module", || {
            let module = device
                .context()
                .load_module(Ptx::from_binary(data))
                .map_err(|e| driver_error(&format!("[{what}] loading the compiled module"), e))?;
            module.load_function(symbol).map_err(|e| {
                driver_error(
                    &format!("[{what}] finding kernel `{symbol}` in the compiled module"),
                    e,
                )
            })
        })
    })
}

// ----- compile checks -----------------------------------------------------------------------

/// Compiles every built-in CUDA kernel, every variant the launchers can ask for, to CUBIN
/// for `arch` (`"sm_80"`, `"sm_90"`, ...). Needs libnvrtc but no GPU: CI runs it to prove the
/// kernels compile. Bypasses the caches. Files built for one architecture-specific target
/// (the Hopper attention kernel, `sm_90a`) are compiled for it when `arch` is `sm_90` or
/// `sm_90a` and left out otherwise; their [`KernelCheck::arch`] names that target.
///
/// # Errors
/// `Error::CudaUnavailable` without libnvrtc; `Error::Compile` with NVRTC's log for the
/// first file that fails.
pub fn check_builtin_kernels(arch: &str) -> Result<Vec<KernelCheck>> {
    let files: Vec<(KernelFile, Vec<String>)> = super::registry()
        .iter()
        .map(|r| (r.file, (r.variants)()))
        .collect();
    // One NVRTC program per file, compiled side by side (NVRTC is thread-safe across
    // programs).
    let results: Vec<Result<KernelCheck>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .filter(|(file, _)| file.arch.is_none() || matches!(arch, "sm_90" | "sm_90a"))
            .map(|(file, variants)| {
                let arch = file.arch.unwrap_or(arch);
                scope.spawn(move || check_file(file, variants, arch))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Compile("a compile thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect()
}

fn check_file(file: &KernelFile, variants: &[String], arch: &str) -> Result<KernelCheck> {
    let started = std::time::Instant::now();
    let cubin = compile(file, variants, &[], arch)?;
    let compile_seconds = started.elapsed().as_secs_f64();
    if let Some(i) = cubin.lowered.iter().position(|n| n.is_empty()) {
        return Err(Error::Compile(format!(
            "{}: no lowered name for {}",
            file.name, variants[i]
        )));
    }
    Ok(KernelCheck {
        file: file.name,
        arch: arch.to_string(),
        variants: variants.len(),
        cubin_bytes: cubin.image.len(),
        compile_seconds,
    })
}

/// The function memoised on `device` under `key`, or the one `make` returns, memoised.
/// `make` runs without the lock, so threads needing different kernels compile in parallel;
/// two threads racing for the same kernel both compile, and the first to finish wins.
fn memoized(
    device: &CudaDevice,
    key: String,
    make: impl FnOnce() -> Result<CudaFunction>,
) -> Result<CudaFunction> {
    let lock_error = || Error::Cuda("the kernel cache was poisoned by a panic".into());
    if let Some(f) = device.functions.lock().map_err(|_| lock_error())?.get(&key) {
        return Ok(f.clone());
    }
    let f = make()?;
    let mut functions = device.functions.lock().map_err(|_| lock_error())?;
    Ok(functions.entry(key).or_insert(f).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_files_round_trip_and_reject_damage() {
        let cubin = Cubin {
            image: vec![1, 2, 3, 4, 5],
            lowered: vec!["_Z3fooi".into(), "_Z3barv".into()],
        };
        let data = encode("key", &cubin);
        assert_eq!(decode(&data, "key"), Some(cubin));
        assert_eq!(decode(&data, "other key"), None);
        for i in [0, 9, data.len() / 2, data.len() - 1] {
            let mut bad = data.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad, "key"), None, "flipped byte {i}");
        }
        assert_eq!(decode(&data[..data.len() - 3], "key"), None);
        assert_eq!(decode(&[], "key"), None);
    }

    const NORM_CU: KernelFile = KernelFile::new("norm.cu", "a");
    const COPY_CU: KernelFile = KernelFile::new("copy.cu", "b");

    #[test]
    fn cache_keys_depend_on_every_input() {
        let names = vec!["k<ff_f32>".to_string()];
        let opts = vec!["--gpu-architecture=sm_90".to_string()];
        let base = cache_key(&NORM_CU, &names, &opts, (13, 0));
        assert_ne!(base, cache_key(&COPY_CU, &names, &opts, (13, 0)));
        assert_ne!(base, cache_key(&NORM_CU, &names, &opts, (13, 1)));
        let opts80 = vec!["--gpu-architecture=sm_80".to_string()];
        assert_ne!(base, cache_key(&NORM_CU, &names, &opts80, (13, 0)));
        let names2 = vec!["k<ff_f16>".to_string()];
        assert_ne!(base, cache_key(&NORM_CU, &names2, &opts, (13, 0)));
    }
}
