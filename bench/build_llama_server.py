"""Build llama.cpp's own `llama-server` once, from the llama.cpp sources vendored in the sdist of the
llama-cpp-python version installed here (so both sides run the same llama.cpp), CPU only, Release,
into tests/checkpoints.CACHE / "llama-server". bench_serve.py runs it as the anchor contender.

The build takes 10+ minutes on two busy cores; start it early:

    nice python bench/build_llama_server.py            # prints the binary's path when done
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.checkpoints import CACHE, llama_cpp_sdist  # noqa: E402

OUT = CACHE / "llama-server"


def binary() -> Path:
    """Where the built server lives (one build per installed llama-cpp-python version)."""
    return OUT / f"llama-server-{version('llama-cpp-python')}"


def build() -> Path:
    """Configure and build only the `llama-server` target (static, no curl, no GPU backends) in a temp
    dir, and move the binary into place under a temp name first (a half-written binary never shows)."""
    out = binary()
    if out.is_file():
        return out
    if not (shutil.which("cmake") and shutil.which("c++")):
        raise RuntimeError("cmake and a C++ compiler are needed to build llama-server")
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        with tarfile.open(llama_cpp_sdist(version("llama-cpp-python"))) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(work, members=members, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", str(src), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", jobs],
                       check=True)
        OUT.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(".part")
        shutil.copy2(work / "build" / "bin" / "llama-server", part)
        os.replace(part, out)
    return out


if __name__ == "__main__":
    print(build())
