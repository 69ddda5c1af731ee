"""Build of fusedreg._C: the C++ CPU kernels always, the CUDA kernels when possible.

Switches (environment):
  FUSEDREG_BUILD_CUDA   "1" forces the CUDA kernels (fails if it cannot), "0" skips them,
                        unset/"auto" builds them when torch is a CUDA build and nvcc is found.
  TORCH_CUDA_ARCH_LIST  the usual torch switch; when unset and no GPU is visible, "9.0".
  FUSEDREG_NVCC_FLAGS   extra nvcc flags, e.g. "-Xptxas -v" (benchmarks/gpu_check.sh reads the
                        register report from the build log).
  FUSEDREG_CPU_ARCH     extra -m flags for the CPU kernels (default: none, portable x86-64).
  MAX_JOBS              parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fusedreg setup] {msg}", file=sys.stderr, flush=True)


def _cuda_decision():
    """Returns (build_cuda, reason)."""
    mode = os.environ.get("FUSEDREG_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False, "FUSEDREG_BUILD_CUDA=0"
    import torch

    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc not found (set CUDA_HOME)")
    elif not cuda_home:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(nvcc))
    if problems:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError("FUSEDREG_BUILD_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {os.environ['CUDA_HOME']}"


def _extensions():
    # Decided (and CUDA_HOME set) before torch.utils.cpp_extension is imported: that import
    # fixes its CUDA_HOME guess, which is /usr/local when only a /usr/local/bin/nvcc wrapper is
    # on the PATH, and the link then cannot find -lcudart.
    build_cuda, reason = _cuda_decision()
    import torch
    from torch.utils import cpp_extension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0 overrides the -g of Python's CFLAGS: debug info of the three instruction-set copies
    # of every loop made the CPU compile a third slower and the objects 14x larger.
    # -fno-trapping-math: nothing here reads floating-point exception flags, and under GCC's
    # default a loop whose selects compare floats (the dropout keep test, Lion's sign) is
    # if-converted only with AVX-512's masks, so its AVX2 and baseline copies stayed scalar
    # (bias_dropout forward at 1024x1024, one thread, AVX2: 3.4 -> 2.2 ms; with gelu_tanh 6.4 ->
    # 2.7 ms). It changes which code is generated, not what IEEE arithmetic computes.
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
           "-Wno-unknown-pragmas"]
    cxx += os.environ.get("FUSEDREG_CPU_ARCH", "").split()
    link = ["-fopenmp"]

    if build_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += cu
        # The nvidia-* wheels keep cuBLAS/cuSPARSE headers that ATen/cuda headers include.
        import site

        for sp in site.getsitepackages():
            for sub in ("cu13", "cu12"):
                inc = os.path.join(sp, "nvidia", sub, "include")
                if os.path.isdir(inc):
                    include_dirs.append(inc)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += os.environ.get("FUSEDREG_NVCC_FLAGS", "").split()
        _log(f"building CPU + CUDA kernels ({reason}); {len(cu)} .cu files, "
             f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'native')}")
        ext = cpp_extension.CUDAExtension(
            "fusedreg._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link, py_limited_api=False)
    else:
        _log(f"building CPU kernels only (CUDA skipped: {reason})")
        ext = cpp_extension.CppExtension(
            "fusedreg._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fusedreg", "fusedreg.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
