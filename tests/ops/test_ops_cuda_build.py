"""The top-level CMake build: the CUDA kernel library for sm_80 + sm_90, and the host tests (ctest).

Configures and builds into a temporary directory (Release, -j2), then runs ctest. No GPU is needed:
nvcc compiles for the listed architectures and the host tests are plain C++.
"""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# Every test here needs the CMake build (~25 s on 2 cores, once per run).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy triton ships with its NVIDIA backend."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "cuobjdump").is_file():
            return str(Path(root) / "bin" / "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    return None


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _configure_and_build(tmp: Path) -> dict:
    assert shutil.which("cmake"), "cmake is required to build kernels/"
    build = tmp / "build"
    run(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    run(["cmake", "--build", str(build), "-j2"])
    return {"build": str(build)}


@pytest.fixture(scope="module")
def build_dir(run_once_per_session) -> Path:
    return Path(run_once_per_session("cmake_build", _configure_and_build)["build"])


def test_host_tests_pass_under_ctest(build_dir):
    proc = run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"])
    assert "100% tests passed" in proc.stdout
    listed = run(["ctest", "--test-dir", str(build_dir), "-N"]).stdout
    expected = sorted(p.stem for p in (REPO / "kernels" / "tests").glob("test_*.cpp"))
    assert "test_box_iou_math" in expected
    for name in expected:
        assert name in listed, f"{name} is not registered with ctest:\n{listed}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler: CMake builds host tests only")
def test_cuda_library_targets_sm80_and_sm90(build_dir):
    library = build_dir / "libmegatron_vrft_kernels.so"
    assert library.is_file(), f"CUDA library not built; build dir has {sorted(p.name for p in build_dir.iterdir())}"
    cuobjdump = find_cuobjdump()
    assert cuobjdump, "cuobjdump not found (PATH, CUDA_HOME, triton's NVIDIA backend)"
    elves = run([cuobjdump, "--list-elf", str(library)]).stdout
    sources = sorted(p.stem for p in (REPO / "kernels").glob("*.cu"))
    assert "box_iou" in sources
    for source in sources:
        for arch in ("sm_80", "sm_90"):
            assert f"{source}.{arch}.cubin" in elves, f"{source} has no {arch} cubin:\n{elves}"
    assert not any(f".sm_{a}." in elves for a in ("50", "52", "75")), elves
    symbols = run(["nm", "-D", "--defined-only", str(library)]).stdout
    for name in ("mvrft_box_iou_pairwise", "mvrft_box_iou_elementwise"):
        assert name in symbols


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler")
def test_cuda_library_box_iou_runs_on_gpu(build_dir):
    """GPU hosts only: call the CMake-built launchers through ctypes and compare with the reference."""
    import ctypes

    from megatron_vrft.ops.box_iou import box_iou_elementwise_reference, box_iou_pairwise_reference

    lib = ctypes.CDLL(str(build_dir / "libmegatron_vrft_kernels.so"))
    lib.mvrft_box_iou_pairwise.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_bool, ctypes.c_void_p]
    )
    lib.mvrft_box_iou_elementwise.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_bool, ctypes.c_void_p]
    gen = torch.Generator().manual_seed(0)
    b, n, m = 3, 70, 130
    xy1, xy2 = torch.rand(b, n, 2, generator=gen) * 50, torch.rand(b, m, 2, generator=gen) * 50
    boxes1 = torch.cat([xy1, xy1 + torch.randn(b, n, 2, generator=gen) * 20], -1)  # some inverted
    boxes2 = torch.cat([xy2, xy2 + torch.randn(b, m, 2, generator=gen) * 20], -1)
    valid1, valid2 = torch.rand(b, n, generator=gen) > 0.2, torch.rand(b, m, generator=gen) > 0.2
    a, c, v1, v2 = (t.cuda().contiguous() for t in (boxes1, boxes2, valid1, valid2))
    for giou in (False, True):
        out = torch.empty(b, n, m, device="cuda")
        err = lib.mvrft_box_iou_pairwise(
            a.data_ptr(), c.data_ptr(), v1.data_ptr(), v2.data_ptr(), out.data_ptr(), b, n, m, giou, None
        )
        torch.cuda.synchronize()
        assert err == 0
        want = box_iou_pairwise_reference(boxes1, boxes2, "giou" if giou else "iou", valid1, valid2)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-6)
        flat = torch.empty(b * n, device="cuda")
        pairs = c[:, :n].contiguous()
        err = lib.mvrft_box_iou_elementwise(a.data_ptr(), pairs.data_ptr(), flat.data_ptr(), b * n, giou, None)
        torch.cuda.synchronize()
        assert err == 0
        want = box_iou_elementwise_reference(boxes1, boxes2[:, :n], "giou" if giou else "iou").reshape(-1)
        torch.testing.assert_close(flat.cpu(), want, rtol=1e-5, atol=1e-6)
