"""Host-side checks of the MogeGating Ascend C operator (ops/ascendc/moge_gating), which cannot be built here.

A small C++ driver around ``op_host/moge_gating_tiling_math.h`` is compiled with g++ and checked against an
independent Python statement of the tiling rules (cover every token exactly once, UB use within budget, 32-byte
alignment, maximal tile, rejection of bad shapes) and against NumPy for the kernel's per-token gating sequence.
A second driver runs the CPU kernel (ops/cpu/moe_kernels.cc, MoGE mode) on the same logits to pin the order.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_DIR = os.path.join(ROOT, "ops", "ascendc", "moge_gating")
HOST_DIR = os.path.join(OP_DIR, "op_host")
CPU_KERNELS = os.path.join(ROOT, "ops", "cpu", "moe_kernels.cc")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not available")

FIELDS = ["status", "totalTokens", "numExperts", "topK", "numGroups", "groupSize", "topKPerGroup", "groupPad",
          "rowLen", "topKPad", "blockDim", "tokensPerCore", "lastCoreTokens", "tileRows", "workElems", "inBytes",
          "weightsBytes", "indicesBytes", "workBytes", "reduceBytes", "scaleBytes", "ubBudget", "ubBytesUsed"]

DRIVER = r"""
#include "moge_gating_tiling_math.h"
#include <cstdio>
#include <cstring>
#include <vector>
// stdin: "tiling T E K M cores ub" | "gate E K M <E logits> <E scales>"; one output line per query.
int main() {
  char cmd[16];
  while (std::scanf("%15s", cmd) == 1) {
    if (!std::strcmp(cmd, "tiling")) {
      long long T, E, K, M, c, ub;
      if (std::scanf("%lld %lld %lld %lld %lld %lld", &T, &E, &K, &M, &c, &ub) != 6) return 1;
      const moge::MogeTiling t = moge::ComputeMogeTiling(T, E, K, M, c, ub);
      std::printf("%d %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld "
                  "%lld %lld %lld %lld\n", t.status, (long long)t.totalTokens, (long long)t.numExperts,
                  (long long)t.topK, (long long)t.numGroups, (long long)t.groupSize, (long long)t.topKPerGroup,
                  (long long)t.groupPad, (long long)t.rowLen, (long long)t.topKPad, (long long)t.blockDim,
                  (long long)t.tokensPerCore, (long long)t.lastCoreTokens, (long long)t.tileRows,
                  (long long)t.workElems, (long long)t.inBytes, (long long)t.weightsBytes,
                  (long long)t.indicesBytes, (long long)t.workBytes, (long long)t.reduceBytes,
                  (long long)t.scaleBytes, (long long)t.ubBudget, (long long)t.ubBytesUsed);
    } else if (!std::strcmp(cmd, "gate")) {
      long long E, K, M;
      if (std::scanf("%lld %lld %lld", &E, &K, &M) != 3) return 1;
      std::vector<float> x(E), s(E), w(K);
      std::vector<int> idx(K);
      for (auto &v : x) if (std::scanf("%f", &v) != 1) return 1;
      for (auto &v : s) if (std::scanf("%f", &v) != 1) return 1;
      moge::MogeGateTokenReference(x.data(), s.data(), E, K, M, w.data(), idx.data());
      for (long long j = 0; j < K; ++j) std::printf("%.9g %d ", w[j], idx[j]);
      std::printf("\n");
    } else {
      return 1;
    }
  }
  return 0;
}
"""

# Calls MoeGating of ops/cpu/moe_kernels.cc (aot CPU ABI) in MoGE mode: softmax, no bias, no renormalisation.
CPU_DRIVER = r"""
#include <cstdint>
#include <cstdio>
#include <vector>
extern "C" int MoeGating(int, void **, int *, int64_t **, const char **, void *, void *);
// stdin: T E K M, then T*E logits; stdout: T*K "weight index" pairs.
int main() {
  long long T, E, K, M;
  if (std::scanf("%lld %lld %lld %lld", &T, &E, &K, &M) != 4) return 1;
  std::vector<float> x(T * E), bias(E, 0.0f), w(T * K), scores(T * E);
  std::vector<float> config = {1.0f, 0.0f, 0.0f, 1.0f, (float)M};  // moge, softmax, no renorm, scale 1, groups
  std::vector<int32_t> idx(T * K), counts(E);
  for (auto &v : x) if (std::scanf("%f", &v) != 1) return 1;
  int64_t sx[2] = {T, E}, sb[1] = {E}, sc[1] = {5}, sw[2] = {T, K}, ss[2] = {T, E}, sn[1] = {E};
  int64_t *shapes[7] = {sx, sb, sc, sw, sw, ss, sn};
  int ndims[7] = {2, 1, 1, 2, 2, 2, 1};
  void *params[7] = {x.data(), bias.data(), config.data(), w.data(), idx.data(), scores.data(), counts.data()};
  const char *dtypes[7] = {"float32", "float32", "float32", "float32", "int32", "float32", "int32"};
  if (MoeGating(7, params, ndims, shapes, dtypes, nullptr, nullptr) != 0) return 2;
  for (long long i = 0; i < T * K; ++i) std::printf("%.9g %d ", w[i], idx[i]);
  std::printf("\n");
  return 0;
}
"""


def _compile(tmp_dir, name, source, extra=()):
    src = os.path.join(tmp_dir, f"{name}.cc")
    exe = os.path.join(tmp_dir, name)
    with open(src, "w") as fh:
        fh.write(source)
    cmd = ["g++", "-O1", "-std=c++17", "-Wall", "-Werror", "-I", HOST_DIR, src, *extra, "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return _compile(str(tmp_path_factory.mktemp("moge_tiling")), "driver", DRIVER)


def _run(exe, text):
    proc = subprocess.run([exe], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def tilings(driver, cases):
    lines = _run(driver, "".join("tiling " + " ".join(map(str, c)) + "\n" for c in cases))
    return [dict(zip(FIELDS, map(int, line.split()))) for line in lines]


# ---- independent statement of the tiling rules ---------------------------------------------------------------
UB_910B = 192 * 1024
RESERVED = 8 * 1024


def cdiv(a, b):
    return -(-a // b)


def align(a, b):
    return cdiv(a, b) * b


def reduce_work_floats(n):
    """CANN ReduceMax sharedTmpBuffer (fp32, calIndex=True): three rounds, 64 floats/repeat, 8 floats/block."""
    r1 = cdiv(n, 64) * 2
    r2 = cdiv(r1, 64) * 2
    r3 = cdiv(r2, 64) * 2
    return align(r1, 8) + align(r2, 8) + align(r3, 8)


def expected(T, E, K, M, cores, ub):
    G, kg = E // M, K // M
    gpad = align(G, 8)
    row = M * gpad
    kpad = align(K, 8)
    work = reduce_work_floats(row)
    fixed = 4 * work + 32 + 4 * align(E, 8)
    per_row = 2 * 4 * (row + 2 * kpad)  # double-buffered logits row + weights row + indices row
    tpc = cdiv(T, cores)
    blocks = cdiv(T, tpc)
    rows = min((ub - RESERVED - fixed) // per_row, tpc, 4095 // M)
    return dict(status=0, totalTokens=T, numExperts=E, topK=K, numGroups=M, groupSize=G, topKPerGroup=kg,
                groupPad=gpad, rowLen=row, topKPad=kpad, blockDim=blocks, tokensPerCore=tpc,
                lastCoreTokens=T - (blocks - 1) * tpc, tileRows=rows, workElems=work, inBytes=4 * rows * row,
                weightsBytes=4 * rows * kpad, indicesBytes=4 * rows * kpad, workBytes=4 * work, reduceBytes=32,
                scaleBytes=4 * align(E, 8), ubBudget=ub - RESERVED,
                ubBytesUsed=2 * 4 * rows * (row + 2 * kpad) + fixed)


SHAPES = [(64, 8, 8), (16, 4, 4), (12, 3, 6), (256, 8, 8)]  # (E, M, K): Pro MoE, small, odd group size, large
CASES = [(T, E, K, M, cores, UB_910B) for T in (1, 7, 4096, 32768) for (E, M, K) in SHAPES for cores in (20, 24, 40)]
CASES += [(32768, 16, 4, 4, 1, 1 << 20), (5000, 64, 8, 8, 2, 1 << 20)]  # a larger UB: the blockCount cap binds


def test_tiling_matches_independent_rules(driver):
    for case, got in zip(CASES, tilings(driver, CASES)):
        assert got == expected(*case), case


def test_tiling_covers_every_token_once_within_ub(driver):
    for (T, E, K, M, cores, ub), t in zip(CASES, tilings(driver, CASES)):
        assert t["status"] == 0
        assert 1 <= t["blockDim"] <= cores and t["blockDim"] == min(cores, cdiv(T, t["tokensPerCore"]))
        # the kernel's loop arithmetic (op_kernel/moge_gating.cpp Init/Process), token by token
        seen = np.zeros(T, dtype=np.int64)
        for core in range(t["blockDim"]):
            n = t["lastCoreTokens"] if core == t["blockDim"] - 1 else t["tokensPerCore"]
            assert n >= 1
            first = core * t["tokensPerCore"]
            for row0 in range(0, n, t["tileRows"]):
                rows = min(t["tileRows"], n - row0)
                assert 1 <= rows <= t["tileRows"] and rows * M <= 4095  # DataCopyPad blockCount
                seen[first + row0:first + row0 + rows] += 1
        assert (seen == 1).all(), (T, E, K, M, cores)
        # UB: every buffer and every group start 32B-aligned, total within budget, tile as large as allowed
        sizes = [t[k] for k in ("inBytes", "weightsBytes", "indicesBytes", "workBytes", "reduceBytes", "scaleBytes")]
        assert all(s > 0 and s % 32 == 0 for s in sizes)
        assert (4 * t["groupPad"]) % 32 == 0 and (4 * t["rowLen"]) % 32 == 0 and (4 * t["topKPad"]) % 32 == 0
        assert t["groupPad"] >= E // M and t["topKPad"] >= K and t["workElems"] >= reduce_work_floats(t["rowLen"])
        used = 2 * (sizes[0] + sizes[1] + sizes[2]) + sum(sizes[3:])
        assert used == t["ubBytesUsed"] <= ub - RESERVED
        per_row = 2 * 4 * (t["rowLen"] + 2 * t["topKPad"])
        if t["tileRows"] < min(t["tokensPerCore"], 4095 // M):
            assert used + per_row > ub - RESERVED


def test_tiling_rejects_bad_inputs(driver):
    bad = {  # (T, E, K, M, cores, ub): status
        (0, 64, 8, 8, 20, UB_910B): 1, (-3, 64, 8, 8, 20, UB_910B): 1, (8, 0, 8, 8, 20, UB_910B): 1,
        (8, 64, 0, 8, 20, UB_910B): 1, (8, 64, 8, 0, 20, UB_910B): 1,
        (8, 64, 6, 6, 20, UB_910B): 2,    # E % M
        (8, 64, 12, 8, 20, UB_910B): 3,   # K % M
        (8, 16, 20, 4, 20, UB_910B): 4,   # K / M > E / M
        (8, 64, 8, 8, 0, UB_910B): 5,     # no cores
        (1 << 31, 64, 8, 8, 20, UB_910B): 6,
        (8, 256, 8, 8, 20, RESERVED + 2048): 7,  # one row does not fit
        (8, 65536, 8, 8, 20, UB_910B): 7,
    }
    for case, got in zip(bad, tilings(driver, list(bad))):
        assert got["status"] == bad[case], (case, got["status"])


# ---- per-token gating sequence of the kernel vs NumPy ----------------------------------------------------------
def numpy_moge(x, scale, K, M):
    """softmax over E (float64), top-K/M per contiguous group by (score desc, index asc), weights * scale."""
    T, E = x.shape
    G, kg = E // M, K // M
    s = np.exp(x - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    idx = np.zeros((T, K), np.int64)
    for t in range(T):
        for g in range(M):
            grp = s[t, g * G:(g + 1) * G]
            order = np.lexsort((np.arange(G), -grp))[:kg]
            idx[t, g * kg:(g + 1) * kg] = g * G + order
    return np.take_along_axis(s, idx, 1) * scale[idx], idx


def gate(driver, x, scale, K, M):
    fmt = lambda a: " ".join(f"{v:.9g}" for v in a)
    text = "".join(f"gate {x.shape[1]} {K} {M} {fmt(row)} {fmt(scale)}\n" for row in x)
    out = np.array([line.split() for line in _run(driver, text)], dtype=np.float64)
    return out[:, 0::2], out[:, 1::2].astype(np.int64)


@pytest.mark.parametrize("E,M,K", SHAPES)
def test_reference_gating_matches_numpy(driver, E, M, K):
    rng = np.random.default_rng(E * 100 + M)
    x = (rng.standard_normal((16, E)) * 3).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, E).astype(np.float32)
    w, idx = gate(driver, x, scale, K, M)
    w_ref, idx_ref = numpy_moge(x.astype(np.float64), scale.astype(np.float64), K, M)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(w, w_ref, rtol=2e-5, atol=1e-7)


def test_reference_gating_ties_go_to_lower_index(driver):
    E, M, K = 12, 3, 6  # groups of 4 (padded to 8 in UB), 2 picks per group
    x = np.array([[1, 1, 0, 1, 2, 0, 2, 2, 0, 0, 0, 0],
                  [0, 3, 3, 3, -1, -1, -1, -1, 5, 4, 5, 4]], np.float32)
    w, idx = gate(driver, x, np.ones(E, np.float32), K, M)
    np.testing.assert_array_equal(idx, [[0, 1, 4, 6, 8, 9], [1, 2, 4, 5, 8, 10]])
    np.testing.assert_array_equal(idx, numpy_moge(x.astype(np.float64), np.ones(E), K, M)[1])
    assert w[0, 0] == w[0, 1] and w[1, 4] == w[1, 5]


def test_reference_gating_matches_cpu_kernel(driver, tmp_path):
    exe = _compile(str(tmp_path), "cpu_driver", CPU_DRIVER, extra=(CPU_KERNELS, "-pthread"))
    E, M, K = 64, 8, 8
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((32, E)) * 2).astype(np.float32)
    x[0, :8] = 0.5  # an all-tied group
    scale = rng.uniform(0.5, 1.5, E).astype(np.float32)
    fmt = " ".join(f"{v:.9g}" for v in x.ravel())
    cpu = np.array(_run(exe, f"{x.shape[0]} {E} {K} {M} {fmt}\n")[0].split(), dtype=np.float64)
    cpu_w, cpu_idx = cpu[0::2].reshape(-1, K), cpu[1::2].reshape(-1, K).astype(np.int64)
    w, idx = gate(driver, x, scale, K, M)
    np.testing.assert_array_equal(idx, cpu_idx)
    np.testing.assert_allclose(w, cpu_w * scale[cpu_idx], rtol=2e-5, atol=1e-7)  # CPU path scales in the layer


def test_build_script_fails_clearly_without_cann(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ASCEND_HOME_PATH"}
    env["BUILD_DIR"] = str(tmp_path / "build")
    proc = subprocess.run(["bash", os.path.join(OP_DIR, "build.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "ASCEND_HOME_PATH" in proc.stderr
    assert not (tmp_path / "build").exists()
