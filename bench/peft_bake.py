"""PEFT's way of baking an OFT adapter into a UNet, timed: the comparator of bench/run.sh.

    python bench/peft_bake.py bake   BASE.safetensors ADAPTER_DIR OUT.safetensors
    python bench/peft_bake.py verify BASE.safetensors ADAPTER_DIR PEFT_OUT.safetensors [OFTOOL_OUT.safetensors]

`bake` does what a user of diffusers + PEFT does: UNet2DConditionModel.from_pretrained (fp16, a
diffusers folder whose weights file is a symlink to BASE), PeftModel.from_pretrained,
merge_and_unload, save_file of the state dict, fsync. It prints one JSON line with the time of
each phase (`seconds` = everything after the imports), the time of the imports and the peak RSS.

`verify` (never timed) checks that PEFT really merged: every adapter target must differ from the
base in PEFT's output (PEFT merges nothing, silently, when module names do not match), and with
OFTOOL_OUT it reports how far oftool's output is from PEFT's (max |Δ| and in fp16 ulps).

The UNet config is SD1.5's (same as tests/data/keys/generate.py); the base's key names and shapes
are checked against the model before anything is timed.
"""

import json
import os
import resource
import sys
import time

T_START = time.perf_counter()

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

T_IMPORTED = time.perf_counter()

SD15 = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def header_shapes(path):
    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def model_dir(base):
    """A diffusers model folder beside BASE: config.json + a symlink to the weights."""
    d = os.path.join(os.path.dirname(os.path.abspath(base)), "peft_unet")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.json")
    if not os.path.exists(cfg):
        UNet2DConditionModel.from_config(SD15).save_config(d)
    link = os.path.join(d, "diffusion_pytorch_model.safetensors")
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link)
    os.symlink(os.path.abspath(base), link)
    return d


def check_keys(base):
    with torch.device("meta"):
        m = UNet2DConditionModel.from_config(SD15)
    want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    have = header_shapes(base)
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        extra = sorted(set(have) - set(want))[:5]
        bad = [k for k in want if k in have and want[k] != have[k]][:5]
        sys.exit(f"peft_bake: {base} is not an SD1.5 diffusers UNet: missing {missing}, extra {extra}, shapes {bad}")


def bake(base, adapter, out):
    check_keys(base)
    d = model_dir(base)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(d, torch_dtype=torch.float16)
    t1 = time.perf_counter()
    model = PeftModel.from_pretrained(unet, adapter)
    t2 = time.perf_counter()
    merged = model.merge_and_unload()
    t3 = time.perf_counter()
    sd = {k: v.contiguous() for k, v in merged.state_dict().items()}
    save_file(sd, out, metadata={"format": "pt"})
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t4 = time.perf_counter()
    print(json.dumps({
        "seconds": t4 - t0,
        "load_base": t1 - t0,
        "load_adapter": t2 - t1,
        "merge": t3 - t2,
        "save_sync": t4 - t3,
        "imports": T_IMPORTED - T_START,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_written": os.path.getsize(out),
        "torch": torch.__version__,
    }))


def targets(adapter):
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    pre, suf = "base_model.model.", ".oft_R.weight"
    return [k[len(pre):-len(suf)] + ".weight" for k in keys if k.startswith(pre) and k.endswith(suf)]


def verify(base, adapter, peft_out, oftool_out=None):
    tg = targets(adapter)
    report = {"targets": len(tg)}
    with safe_open(base, "pt") as b, safe_open(peft_out, "pt") as p:
        if set(b.keys()) != set(p.keys()):
            sys.exit("peft_bake verify: PEFT's output has other keys than the base")
        unchanged = [k for k in tg if torch.equal(b.get_tensor(k), p.get_tensor(k))]
        report["peft_targets_changed"] = len(tg) - len(unchanged)
        others = [k for k in b.keys() if k not in set(tg)]
        report["peft_others_changed"] = sum(not torch.equal(b.get_tensor(k), p.get_tensor(k)) for k in others)
        if unchanged:
            report["ok"] = False
            print(json.dumps(report))
            sys.exit(f"peft_bake verify: PEFT left {len(unchanged)} target(s) unchanged, e.g. {unchanged[:3]}")
        if oftool_out:
            with safe_open(oftool_out, "pt") as o:
                worst, worst_ulp, worst_key, n_diff, n = 0.0, 0, None, 0, 0
                for k in tg:
                    x, y = p.get_tensor(k), o.get_tensor(k)
                    d = (x.float() - y.float()).abs().max().item()
                    # ulp distance of fp16 values (same-sign values here are overwhelmingly the case)
                    xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
                    xi = torch.where(xi < 0, -32768 - xi, xi)
                    yi = torch.where(yi < 0, -32768 - yi, yi)
                    u = (xi - yi).abs().max().item()
                    n_diff += int((x != y).sum().item())
                    n += x.numel()
                    if u > worst_ulp:
                        worst, worst_ulp, worst_key = d, u, k
                    worst = max(worst, d)
                report.update({"vs_oftool_max_abs": worst, "vs_oftool_max_ulp": worst_ulp,
                               "vs_oftool_worst_tensor": worst_key,
                               "vs_oftool_fraction_differing": n_diff / max(n, 1)})
    report["ok"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "bake":
        bake(*sys.argv[2:])
    elif len(sys.argv) in (5, 6) and sys.argv[1] == "verify":
        verify(*sys.argv[2:])
    else:
        sys.exit(__doc__)
