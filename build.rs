//! Link-time settings for the `strait` and `strait-sidecar` executables.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Relative relocations packed (DT_RELR, glibc 2.36+; the executables then require the
        // loader's GLIBC_ABI_DT_RELR and fail to start on an older one rather than misbehave).
        // A position-independent executable carries one 24-byte entry per pointer in its
        // read-only data; the loader reads them all at start, so every process kept them
        // resident: 0.5 MiB of each sidecar's idle RSS (README, "Scale and performance").
        // Packed, they take a few KiB; the executables are still position-independent.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
