//! Compiles every built-in CUDA kernel, every variant the launchers use, to CUBIN for sm_80
//! and sm_90 through NVRTC (the Hopper attention kernels, `*_sm90.cu`, for sm_90a, with the
//! sm_90 files). Needs libnvrtc but no GPU (CI: `. scripts/nvrtc-env` first);
//! without libnvrtc it prints a line and passes.
#![cfg(feature = "cuda")]

use ferrofast::testing::{check_builtin_kernels, nvrtc_version};
use ferrofast::Error;

#[test]
fn every_kernel_variant_compiles_to_cubin() {
    let version = match nvrtc_version() {
        Ok(v) => v,
        Err(Error::CudaUnavailable(msg)) => {
            println!("skipping the CUDA kernel compile check: {msg}");
            return;
        }
        Err(e) => panic!("NVRTC is present but unusable: {e}"),
    };
    println!("NVRTC {}.{}", version.0, version.1);
    for arch in ["sm_80", "sm_90"] {
        let started = std::time::Instant::now();
        let checks = check_builtin_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert!(!checks.is_empty());
        let hopper = checks
            .iter()
            .filter(|c| c.file.ends_with("_sm90.cu"))
            .count();
        assert_eq!(
            hopper,
            if arch == "sm_90" { 2 } else { 0 },
            "{arch}: the sm_90a kernels belong to sm_90 only"
        );
        for c in &checks {
            if c.file.ends_with("_sm90.cu") {
                assert_eq!(c.arch, "sm_90a");
            } else {
                assert_eq!(c.arch, arch);
            }
            assert!(c.variants > 0 && c.cubin_bytes > 0, "{c:?}");
            println!(
                "{arch}: {} compiled, {} variants, {} bytes of CUBIN, {:.1} s",
                c.file, c.variants, c.cubin_bytes, c.compile_seconds
            );
        }
        println!("{arch}: {:.1} s", started.elapsed().as_secs_f64());
    }
}

#[test]
fn a_bad_architecture_is_a_compile_error_not_a_panic() {
    if nvrtc_version().is_err() {
        println!("skipping: no libnvrtc");
        return;
    }
    match check_builtin_kernels("sm_1") {
        Err(Error::Compile(msg)) => assert!(msg.contains("sm_1"), "{msg}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}
