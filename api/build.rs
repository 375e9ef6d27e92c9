fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a fresh machine needs nothing installed to build.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/strait.proto");
    tonic_prost_build::configure().compile_protos(&["proto/strait.proto"], &["proto"])?;
    Ok(())
}
