"""Checks a `tern quantize --method fp8` file against PyTorch: every layer matrix's scales must be
max|w| / 448 (per output row, or per tensor) of the f32 weights, and its E4M3 codes must equal
`(w / scale).to(torch.float8_e4m3fn)`.

    tern quantize -m smollm2-135m --method f32 -o /tmp/f32.gguf
    tern quantize -m smollm2-135m --method fp8 -o /tmp/fp8.gguf     # or --fp8-scale tensor
    /tmp/refenv/bin/python reference/check_fp8.py /tmp/f32.gguf /tmp/fp8.gguf
"""
import sys

import gguf
import numpy as np
import torch

full = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
q = gguf.GGUFReader(sys.argv[2])
assert bytes(q.fields["tern.quantize.method"].parts[-1]).decode() == "fp8", "not a tern fp8 file"
per_tensor = bytes(q.fields["tern.quantize.fp8_scale"].parts[-1]).decode() == "tensor"
qt = {t.name: t for t in q.tensors}
n_mats = n_codes = bad_codes = 0
worst_scale = 0.0
for name, t in qt.items():
    scale_name = name.removesuffix(".weight") + ".scale"
    if scale_name not in qt:
        continue
    w = torch.tensor(np.array(full[name].data, dtype=np.float32))
    codes = torch.tensor(np.array(t.data).view(np.uint8).reshape(w.shape))
    s = torch.tensor(np.array(qt[scale_name].data, dtype=np.float32))
    s_ref = (w.abs().amax() if per_tensor else w.abs().amax(dim=1)) / 448.0
    worst_scale = max(worst_scale, float(((s - s_ref).abs() / s_ref.clamp_min(1e-30)).max()))
    ref = (w / (s_ref if per_tensor else s_ref[:, None])).to(torch.float8_e4m3fn).view(torch.uint8)
    bad_codes += int((ref != codes).sum())
    n_codes += codes.numel()
    n_mats += 1
print(f"{n_mats} matrices ({'per tensor' if per_tensor else 'per channel'}), {n_codes} codes: "
      f"{bad_codes} differ from torch, scales within {worst_scale:.1e} (relative)")
sys.exit(1 if bad_codes or worst_scale > 1e-6 or n_mats == 0 else 0)
