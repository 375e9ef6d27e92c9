fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs nothing installed to build.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/strait.proto");
    println!("cargo:rerun-if-changed=proto/config_wire.proto");
    tonic_prost_build::configure().compile_protos(&["proto/strait.proto"], &["proto"])?;
    // The controller's config-stream server, writing resources it encoded once (`pb::wire`):
    // same package, so it goes to a directory of its own.
    let wire = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("wire");
    std::fs::create_dir_all(&wire)?;
    tonic_prost_build::configure()
        .out_dir(&wire)
        .build_client(false)
        .extern_path(".strait.v1.ProxyMessage", "crate::pb::ProxyMessage")
        .bytes(".strait.v1.ConfigUpdateWire.resources")
        .compile_protos(&["proto/config_wire.proto"], &["proto"])?;
    Ok(())
}
