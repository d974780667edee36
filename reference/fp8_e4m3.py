"""E4M3 encoding reference: PyTorch's float8_e4m3fn conversion of f32 values, for tern's
E4M3 codec test (crates/tern-core/src/kernels/fp8.rs).

Writes crates/tern-core/src/kernels/testdata/e4m3_torch.txt: one line per value, the f32 bit
pattern and torch's code, both hex. The values are every code's neighbourhood (exact codes,
midpoints between neighbours, which are rounding ties, and values just off them), subnormals,
and random values over the whole range; all within ±448 (tern saturates there, torch makes
NaN above 464).

    /tmp/refenv/bin/python reference/fp8_e4m3.py
"""
import pathlib

import numpy as np
import torch

out = pathlib.Path(__file__).resolve().parent.parent / "crates/tern-core/src/kernels/testdata/e4m3_torch.txt"
codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
mids = (codes[1:] + codes[:-1]) / 2
vals = [codes, mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids + 1)]
rng = np.random.default_rng(0)
vals.append(torch.tensor(rng.standard_normal(2000) * np.exp(rng.uniform(-12, 6, 2000)), dtype=torch.float32))
v = torch.cat(vals)
v = torch.cat([v, -v]).clamp(-448, 448)
got = v.to(torch.float8_e4m3fn).view(torch.uint8)
bits = v.view(torch.int32).numpy().astype(np.uint32)
lines = [f"{b:08x} {c:02x}" for b, c in zip(bits, got.numpy())]
out.write_text(f"# torch {torch.__version__}: f32 bits, float8_e4m3fn code\n" + "\n".join(lines) + "\n")
print(f"wrote {len(lines)} values to {out}")
