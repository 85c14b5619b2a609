"""Child process of tests/test_kernels.py: runs the Triton path in Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported (Triton fixes the mode of its own jit
helpers at import), so the parent test starts this script with it in the environment instead of
setting it in the test process, where it would reach every later test.

    TRITON_INTERPRET=1 python tests/kernels_triton_child.py cases.pt outputs.pt

cases.pt: list of dicts {id, config (dict), shape, stored, shared, xs (list of tensors)};
outputs.pt: {"ys": {id: [y, ...]}, "paths": {query: available_paths(...)}}.
"""

from __future__ import annotations

import sys

import torch


def main(src: str, dst: str) -> None:
    torch.set_num_threads(1)
    from reallm import CompressionConfig
    from reallm.layer.kernels import available_paths, frozen_matmul, prepare

    cases = torch.load(src, weights_only=False)
    ys = {}
    for case in cases:
        cfg = CompressionConfig.from_dict(case["config"])
        shape = tuple(case["shape"])
        prep = prepare(case["stored"], cfg, shape, case["shared"])
        ys[case["id"]] = [
            frozen_matmul(x, case["stored"], cfg, shape, case["shared"], path="triton", prepared=prep)
            for x in case["xs"]
        ]
    nf3 = CompressionConfig(quantizer="nf", bits=3)
    vq = CompressionConfig(quantizer="vq", bits=2, options={"dim": 4})
    f32 = torch.float32
    def available_paths_no_avx(*args):
        return [p for p in available_paths(*args) if p != "cpu_avx512"]

    paths = {
        "nf3 T1": available_paths_no_avx(nf3, "cpu", f32, 1),
        "nf3 T5": available_paths_no_avx(nf3, "cpu", f32, 5),
        "nf3 T16 bf16": available_paths_no_avx(nf3, "cpu", torch.bfloat16, 16),
        "nf3 T17": available_paths_no_avx(nf3, "cpu", f32, 17),
        "nf3 f64": available_paths_no_avx(nf3, "cpu", torch.float64, 1),
        "rtn": available_paths_no_avx(CompressionConfig(quantizer="rtn", bits=3), "cpu", f32, 1),
        "vq 64x38": available_paths_no_avx(vq, "cpu", f32, 1, (64, 38)),
    }
    torch.save({"ys": ys, "paths": paths}, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
