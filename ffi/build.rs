//! Gives libpeftrt.so a SONAME, so that a program records `libpeftrt.so` as what it needs
//! however it was linked (CMake links a library by its full path; without a SONAME the program
//! would look for that build-time path at run time).
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpeftrt.so");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
