//! Links libprofalloc.so with `layout.ld`, which groups the code every
//! process runs (see that file).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=layout.ld");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-T,{dir}/layout.ld");
}
