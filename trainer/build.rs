//! Builds the fused CPU kernels (`csrc/fused.cpp`) against the libtorch that torch-sys found
//! (its `links = "tch"` metadata gives the library directory; the headers sit beside it).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/fused.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report the libtorch directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    // libtorch_cuda registers libtorch's CUDA backend when it is loaded, but nothing here calls
    // it by name, so the linker's --as-needed (Ubuntu's default) drops the library torch-sys asks
    // for and `tch::Cuda::is_available()` is false on a GPU machine (torch-sys build.rs says as
    // much). Keep it whenever the libtorch has it (issue #24). One argument, so the order holds.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    // Where torch-sys looks for the headers: LIBTORCH_INCLUDE, else beside the library.
    let include = match std::env::var_os("LIBTORCH_INCLUDE") {
        Some(dir) => PathBuf::from(dir).join("include"),
        None => lib.parent().expect("the libtorch lib directory has a parent").join("include"),
    };
    // The ABI torch-sys builds its own wrapper with (PyPI's torch uses the C++11 ABI).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    // ATen's parallel_for runs on OpenMP only when compiled with it; on Linux torch-sys links
    // libtorch's own libgomp, so these kernels share libtorch's threads and thread count.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        build.flag("-fopenmp");
    }
    build
        .cpp(true)
        .pic(true)
        .std("c++20")
        // As system headers: libtorch's own warnings are not ours to show on every build.
        .flag("-isystem")
        .flag(include.to_str().expect("a UTF-8 libtorch path"))
        .flag("-isystem")
        .flag(include.join("torch/csrc/api/include").to_str().expect("a UTF-8 libtorch path"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // Lets the compiler vectorise the kernels' selects and float-to-int conversions (no
        // code here reads the floating-point exception flags).
        .flag("-fno-trapping-math")
        .file("csrc/fused.cpp")
        .compile("peftrt_fused");
}
