"""Ahead-of-time compile of every Triton kernel variant to cubin for sm_80 and sm_90, without a GPU.

The interpreter (used by the other CPU tests) accepts code the real compiler rejects (layouts,
shared memory, dtype rules); this catches those. Every module in ``MODULES`` must exist and expose
``compile_specs() -> [(jit_function, signature, constexprs)]``. The compiles run in one subprocess
without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` yields functions the compiler
cannot take) and with a fresh cache, so each test really compiles.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ["box_iou_triton", "logprob", "fused_linear_logprob", "grpo_loss"]
ARCHS = (80, 90)

_COMPILE_SCRIPT = r"""
import importlib, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

modules, archs, out_path = sys.argv[1].split(","), [int(a) for a in sys.argv[2].split(",")], sys.argv[3]
results = {}
for name in modules:
    specs = importlib.import_module("megatron_vrft.ops." + name).compile_specs()
    for idx, (fn, signature, constexprs) in enumerate(specs):
        for arch in archs:
            key = f"{name}/{idx}/{arch}"
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))
                ptx = kernel.asm.get("ptx", "")
                target = next((l.split()[1] for l in ptx.splitlines() if l.startswith(".target")), "")
                results[key] = {"cubin_bytes": len(kernel.asm.get("cubin", b"")), "target": target}
            except Exception:
                results[key] = {"error": traceback.format_exc()[-3000:]}
json.dump(results, open(out_path, "w"))
"""


def _collect() -> tuple[list, list[str]]:
    """(params, modules that imported) at collection time; missing modules fail in their own test."""
    params, present = [], []
    for name in MODULES:
        try:
            specs = importlib.import_module(f"megatron_vrft.ops.{name}").compile_specs()
        except Exception:
            continue
        present.append(name)
        for idx, (fn, _, _) in enumerate(specs):
            for arch in ARCHS:
                params.append(pytest.param(name, idx, arch, id=f"{name}-{fn.__name__}-{idx}-sm{arch}"))
    return params, present


PARAMS, PRESENT = _collect()


def _compile_all(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp / "compiled.json"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, ",".join(PRESENT), ",".join(map(str, ARCHS)), str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(run_once_per_session) -> dict:
    return run_once_per_session("triton_aot", _compile_all)


@pytest.mark.parametrize("name", MODULES)
def test_module_exposes_compile_specs(name):
    module = importlib.import_module(f"megatron_vrft.ops.{name}")
    specs = module.compile_specs()
    assert isinstance(specs, list)
    for fn, signature, constexprs in specs:
        arg_names = list(getattr(fn, "arg_names", []))
        assert arg_names, f"{name}: {fn!r} is not a Triton kernel"
        assert set(signature) == set(arg_names), f"{name}.{fn.__name__}: signature keys != kernel args"
        for key in constexprs:
            assert signature[key] == "constexpr", f"{name}.{fn.__name__}: {key} is not marked constexpr"
        for key, ty in signature.items():
            assert ty != "constexpr" or key in constexprs, f"{name}.{fn.__name__}: constexpr {key} has no value"


@pytest.mark.slow  # the shared AOT compile of every kernel: ~15-25 s on 2 cores
@pytest.mark.parametrize("name,idx,arch", PARAMS)
def test_kernel_compiles_to_cubin(compiled, name, idx, arch):
    result = compiled[f"{name}/{idx}/{arch}"]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 1000
    assert result["target"].startswith(f"sm_{arch}"), result["target"]
