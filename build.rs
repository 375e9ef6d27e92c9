//! Link-time settings for the `strait` and `strait-sidecar` executables.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if packs_relative_relocations() {
        // Relative relocations packed (DT_RELR). A position-independent executable carries one
        // 24-byte entry per pointer in its read-only data; the loader reads them all at start,
        // so every process kept them resident: 0.5 MiB of each sidecar's idle RSS (README,
        // "Scale and performance"). Packed, they take a few KiB; the executables are still
        // position-independent. They then need the loader's GLIBC_ABI_DT_RELR (glibc 2.36+).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether to pack: a native build for Linux with glibc, on a machine whose glibc is 2.36 or
/// later (`getconf GNU_LIBC_VERSION`), so that the executables run where they were built (Debian
/// 12, the container image's base, has 2.36; Ubuntu 22.04 and RHEL 9 have older ones, and get
/// unpacked executables rather than ones that do not start). A cross build is not packed.
fn packs_relative_relocations() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" || var("TARGET") != var("HOST") {
        return false;
    }
    let Ok(out) = std::process::Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    glibc_at_least(&String::from_utf8_lossy(&out.stdout), (2, 36))
}

/// `getconf GNU_LIBC_VERSION`'s answer ("glibc 2.36") is at least `min`.
fn glibc_at_least(answer: &str, min: (u32, u32)) -> bool {
    let Some(version) = answer.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= min
}
