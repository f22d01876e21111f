#!/usr/bin/env python
"""Same-machine CPU timing of the official V2Flow PyTorch release (github.com/zhangguiwei610/V2Flow).

Times the release's own code on two settings ("release": 2048 x 256 vocabulary, 16384 codes;
"release-novocab": no vocabulary, 1024 codes): reconstruction (`sample_tokens`) and one training
step. The release checkout and the --no-deps packages are NOT part of this repository: fetch them
(see README.md here) and pass their folders. The release files are only read, never modified; what
the measured paths import but never execute (DC-AE, data loading, distributed, diffusers-based
samplers, the CondOT branch) is stubbed here or in shims/.

Run:  python benchmarks/release_pytorch/bench_release.py --release-dir DIR [--site-dir SITE]
      (about 1-2 min on an idle 2-core box; --no-load-wait skips waiting for a quiet machine)
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from functools import partial

os.environ.setdefault("DPM_TQDM", "True")  # the release's own switch to silence its tqdm bar

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

SHIMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shims")
RELEASE_URL = "https://github.com/zhangguiwei610/V2Flow"
RELEASE_COMMIT = "9077ed6cf6ee44bb4cba2846ba5b4c84ab802c57"    # everything but models/V2Flow.py
V2FLOW_PY_COMMIT = "00fa8941648092fdb9baeafcec3f0ff029ff5aa5"  # models/V2Flow.py
SITE_PACKAGES = "vector-quantize-pytorch==1.22.2 einx==0.3.0 frozendict==2.4.6"

THREADS = 2
torch.set_num_threads(THREADS)


def fetch_help(release_dir="DIR", site_dir="SITE"):
    return (f"  git clone {RELEASE_URL} {release_dir}\n"
            f"  git -C {release_dir} checkout {RELEASE_COMMIT}\n"
            f"  git -C {release_dir} checkout {V2FLOW_PY_COMMIT} -- models/V2Flow.py\n"
            f"  pip install --no-deps --target {site_dir} {SITE_PACKAGES}\n"
            f"then pass --release-dir {release_dir} --site-dir {site_dir} "
            f"(or set V2FLOW_RELEASE_DIR).")


# ---------------------------------------------------------------------------------------------
# stubs for things the measured paths import but never execute
# ---------------------------------------------------------------------------------------------
def _placeholder_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class _Unused:
    def __init__(self, *a, **k):
        raise RuntimeError("stubbed: not on the measured path")


def _unused_fn(*a, **k):
    raise RuntimeError("stubbed: not on the measured path")


def load_release(release_dir, site_dir):
    """Puts the release checkout first on sys.path, then the shims (timm / flow_matching), then the
    --no-deps site dir; installs the stubs; returns the release's `models.V2Flow` module."""
    release_dir = os.path.abspath(release_dir)
    if not os.path.isfile(os.path.join(release_dir, "models", "V2Flow.py")):
        sys.exit(f"error: {release_dir} is not a V2Flow release checkout (no models/V2Flow.py). "
                 f"Fetch it with:\n{fetch_help(release_dir)}")
    paths = [release_dir, SHIMS]
    if site_dir is not None:
        site_dir = os.path.abspath(site_dir)
        if not os.path.isdir(site_dir):
            sys.exit(f"error: --site-dir {site_dir} does not exist. Create it with:\n"
                     f"  pip install --no-deps --target {site_dir} {SITE_PACKAGES}")
        paths.append(site_dir)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)

    # 1. the release hard-codes .cuda(); on a CPU-only box make it a no-op
    torch.Tensor.cuda = lambda self, *a, **k: self
    # 2. diffusers-based / missing sampler modules imported by diffusion/__init__.py (never called)
    _placeholder_module("diffusion.scheduler.flow_euler_sampler", FlowEuler=_Unused)
    _placeholder_module("diffusion.scheduler.sa_sampler", SASolverSampler=_Unused)
    _placeholder_module("diffusion.scheduler.scm_scheduler", SCMScheduler=_Unused)
    # 3. diffusion/model/diffusion_utils.py is absent from the release (only a .pyc); its two
    #    functions are used only by the variational-bound loss, which linear_flow never computes
    _placeholder_module("diffusion.model.diffusion_utils",
                        discretized_gaussian_log_likelihood=_unused_fn, normal_kl=_unused_fn)
    # 4. models/quantizer.py is absent from the release (only a .pyc); it is lucidrains'
    #    vector-quantize-pytorch `VectorQuantize` (same call signature / 3-tuple return; the release
    #    requirements list einx, which that file needs). Alias the PyPI module under the release name.
    try:
        import vector_quantize_pytorch.vector_quantize_pytorch as vqp
    except ImportError as e:
        sys.exit(f"error: cannot import vector_quantize_pytorch ({e}). Install it with:\n"
                 f"  pip install --no-deps --target SITE {SITE_PACKAGES}\n"
                 f"and pass --site-dir SITE.")
    sys.modules["models.quantizer"] = vqp

    from models import V2Flow as release  # release models/V2Flow.py, commit 00fa894
    return release


# ---------------------------------------------------------------------------------------------
B, C_LAT, H_LAT = 4, 32, 8          # 4 latents of 8x8x32 -> L = n = 64
CFG = 2.9                           # release default --cfg
NUM_ITER = 4                        # release default --num_iter


def build(release, setting, vocab_path):
    common = dict(
        img_size=256, vae_stride=32, patch_size=1, vae_embed_dim=C_LAT,
        downsampler_hidden_dim=128, flow_method="linear_flow", projector_depth=1,
        encoder_embed_dim=256, encoder_depth=2, encoder_num_heads=4,
        decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=4,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        mask_ratio_min=0.7, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
        buffer_size=64, flowloss_d=2, flowloss_w=256, num_sampling_steps="100",
        diffusion_batch_mul=4, grad_checkpointing=False,
    )
    if setting == "release":
        # vocabulary mode: STCConnector keeps its own defaults (RegStage depth 4, readout
        # 128 -> 2048 -> 2048), codebook hard-coded to 16384 x 256
        cfg = dict(visual_vocabulary=True, llm_codebook_path=vocab_path)
    else:
        cfg = dict(visual_vocabulary=False, visual_codebook_size=1024,
                   downsampler_depth=2, downsampler_mlp_depth=1)
    return release.V2Flow(**common, **cfg)


def param_groups(model, wd):
    # release uses MAR's util.misc.add_weight_decay (file not in the release): no decay on
    # biases / 1-d params, decay elsewhere.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


class Probe:
    """Records what the MAR encoder/decoder and the velocity MLP actually see (probe run only)."""

    def __init__(self, model):
        self.mar, self.mlp = [], []
        self.h = [
            model.encoder_blocks[0].register_forward_pre_hook(
                lambda m, a: self.mar.append(tuple(a[0].shape))),
            model.decoder_blocks[0].register_forward_pre_hook(
                lambda m, a: self.mar.append(("dec",) + tuple(a[0].shape))),
        ]
        # the release hands the *bound* `net.forward` to DPM-Solver, which bypasses module hooks,
        # so count velocity-MLP calls by shadowing `forward` on the instance for the probe run
        self.net = model.flowloss.net
        orig = type(self.net).forward.__get__(self.net)

        def counting_forward(x, *a, **k):
            self.mlp.append(int(x.shape[0]))
            return orig(x, *a, **k)
        self.net.forward = counting_forward

    def remove(self):
        for h in self.h:
            h.remove()
        del self.net.forward


def load1():
    return os.getloadavg()[0]


def _proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def other_cpu_busy(seconds=4.0):
    """Busy cores over a short window while this process sleeps (detects other workloads)."""
    t0, i0 = _proc_stat()
    time.sleep(seconds)
    t1, i1 = _proc_stat()
    ncpu = os.cpu_count() or 1
    return ncpu * (1.0 - (i1 - i0) / max(1, t1 - t0))


WAIT_BUDGET_S = [600]  # total waiting allowed for the whole run (up to 10 minutes)


def wait_for_quiet(label, enabled, log):
    """If the 1-min load is above ~1.3, wait (sleep 60, re-check, up to 10 min in all).
    Our own previous burst also lifts the 1-min average, so a high average is only treated as
    'someone else is running' if the CPUs are actually busy while we sleep."""
    waited = 0
    while True:
        la = os.getloadavg()
        busy = None
        if la[0] > 1.3:
            busy = other_cpu_busy()
        if (la[0] <= 1.3 or (busy is not None and busy < 0.5) or not enabled
                or WAIT_BUDGET_S[0] < 60):
            log.append((label, la, busy, waited))
            return
        print(f"  [{label}] load {la[0]:.2f}, other CPU use {busy:.2f} cores: waiting 60 s "
              f"({WAIT_BUDGET_S[0]} s of wait budget left)", flush=True)
        time.sleep(60)
        waited += 60
        WAIT_BUDGET_S[0] -= 60


def timed(fn, warmup, calls):
    """Returns (wall times, cores used by OTHER processes on average during the timed calls):
    total busy cores from /proc/stat minus this process's own CPU time (all its threads)."""
    for _ in range(warmup):
        fn()
    ts = []
    s0, own0, w0 = _proc_stat(), os.times(), time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    s1, own1, w1 = _proc_stat(), os.times(), time.perf_counter()
    ncpu = os.cpu_count() or 1
    busy = ncpu * (1.0 - (s1[1] - s0[1]) / max(1, s1[0] - s0[0]))
    own = ((own1.user - own0.user) + (own1.system - own0.system)) / max(1e-9, w1 - w0)
    return ts, max(0.0, busy - own), own


def timed_clean(label, fn, args, loadlog, max_tries=3):
    """Time `fn`; if other processes used > 0.3 cores meanwhile, wait for quiet and redo."""
    for attempt in range(1, max_tries + 1):
        wait_for_quiet(label, not args.no_load_wait, loadlog)
        ts, others, own = timed(fn, args.warmup, args.calls)
        loadlog[-1] = loadlog[-1] + (load1(), others, own, attempt)
        if others <= 0.3 or args.no_load_wait or WAIT_BUDGET_S[0] < 60:
            break
        print(f"  [{label}] other processes used {others:.2f} cores during timing: redo",
              flush=True)
    return ts, others


def flops_of(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Fetching the release and the site packages:\n" + fetch_help())
    env_dir = os.environ.get("V2FLOW_RELEASE_DIR")
    ap.add_argument("--release-dir", default=env_dir, required=env_dir is None,
                    help="checkout of the release (default: $V2FLOW_RELEASE_DIR)")
    ap.add_argument("--site-dir", default=None,
                    help="folder of the --no-deps packages (" + SITE_PACKAGES + "), if they are "
                    "not installed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-load-wait", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    args = ap.parse_args()
    release = load_release(args.release_dir, args.site_dir)

    torch.manual_seed(0)
    np.random.seed(0)
    tmpdir = tempfile.TemporaryDirectory(prefix="v2flow_rel_")
    vocab_path = os.path.join(tmpdir.name, "vocab_2048x256.pt")
    torch.save(torch.randn(2048, 256), vocab_path)  # random stand-in "LLM embedding table"

    latents = torch.randn(B, C_LAT, H_LAT, H_LAT)
    rows, loadlog, notes = [], [], []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, CPU", flush=True)

    for setting in ("release", "release-novocab"):
        torch.manual_seed(1)
        np.random.seed(1)
        model = build(release, setting, vocab_path)
        n_all = sum(p.numel() for p in model.parameters())
        n_cls = model.class_emb.weight.numel()
        n_buf = sum(b.numel() for b in model.buffers())
        print(f"\n== {setting}: {n_all/1e6:.2f} M params ({(n_all-n_cls)/1e6:.2f} M without the "
              f"unused class_emb), {n_buf/1e6:.2f} M buffer values", flush=True)

        # ---------------- reconstruction --------------------------------------------------
        def recon():
            with torch.no_grad():
                return model.sample_tokens(latents, bsz=B, num_iter=NUM_ITER, cfg=CFG,
                                           cfg_schedule="linear", temperature=1.0)

        model.eval()
        probe = Probe(model)
        out = recon()
        probe.remove()
        assert out.shape == latents.shape, out.shape
        enc = [s for s in probe.mar if s[0] != "dec"]
        dec = [s[1:] for s in probe.mar if s[0] == "dec"]
        mlp_rows = probe.mlp
        nfe_per_step = len(mlp_rows) // len(enc)
        per_step_rows = [mlp_rows[i * nfe_per_step] for i in range(len(enc))]
        assert all(mlp_rows[i * nfe_per_step:(i + 1) * nfe_per_step] == [r] * nfe_per_step
                   for i, r in enumerate(per_step_rows))
        mar_txt = (f"{len(enc)} calls x batch {enc[0][0]} (= {len(enc)} cond + {len(enc)} uncond "
                   f"passes of batch {B})")
        mlp_txt = (f"{'/'.join(str(r) for r in per_step_rows)} rows x {nfe_per_step} NFE "
                   f"= {sum(mlp_rows)} row-evals")
        notes.append(f"{setting} reconstruct: encoder inputs {enc}, decoder inputs {dec}; "
                     f"velocity-MLP calls {len(mlp_rows)}, rows per AR step {per_step_rows}")
        gf = None if args.no_flops else flops_of(recon) / 1e9
        ts, oth = timed_clean(f"{setting}/reconstruct", recon, args, loadlog)
        rows.append((setting, "reconstruct", ts, mar_txt, mlp_txt, gf, oth))
        print(f"  reconstruct median {statistics.median(ts):.4f} s", flush=True)

        # ---------------- one training step ------------------------------------------------
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4 * B / 256, betas=(0.9, 0.95))

        def train_step():
            x = latents.clone().mul_(0.41407)       # engine_v2flow: samples.mul_(0.41407)
            loss = model(x)                          # includes the VQ EMA codebook update
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)  # release --grad_clip 3.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        probe = Probe(model)
        train_step()
        probe.remove()
        enc = [s for s in probe.mar if s[0] != "dec"]
        tr_mar = f"1 call x batch {enc[0][0]} (encoder seq {enc[0][1]}, random mask ratio)"
        tr_mlp = f"{probe.mlp[0]} rows x 1 (fwd+bwd; all rows, unmasked ones weight 0)"
        notes.append(f"{setting} train: encoder input {enc[0]}, MLP rows {probe.mlp}")
        gf_t = None if args.no_flops else flops_of(train_step) / 1e9
        ts, oth = timed_clean(f"{setting}/train", train_step, args, loadlog)
        rows.append((setting, "train step", ts, tr_mar, tr_mlp, gf_t, oth))
        print(f"  train step median {statistics.median(ts):.4f} s", flush=True)
        model = opt = None  # free this setting before building the next
    tmpdir.cleanup()

    # ---------------- report ---------------------------------------------------------------
    print("\n| setting | path | median s | min-max s | MAR passes | velocity rows x NFE | GFLOP |")
    print("|---|---|---|---|---|---|---|")
    dirty = False
    for setting, path, ts, mar, mlp, gf, oth in rows:
        gtxt = "-" if gf is None else f"{gf:.2f}"
        flag = "" if oth <= 0.3 else f" (CONTENDED: others {oth:.1f} cores)"
        dirty |= bool(flag)
        print(f"| {setting} | {path} | {statistics.median(ts):.4f}{flag} | "
              f"{min(ts):.4f}-{max(ts):.4f} | {mar} | {mlp} | {gtxt} |")
    if dirty:
        print("\nWARNING: some blocks were timed while other processes were using the CPUs.")
    print(f"\n(B={B} latents of {H_LAT}x{H_LAT}x{C_LAT}, warm-up {args.warmup}, {args.calls} timed "
          f"calls each, torch.set_num_threads({THREADS}), float32 CPU; GFLOP from "
          f"torch.utils.flop_counter (matmul/conv/SDPA only; train step = fwd+bwd))")
    print("\nload averages (1/5/15 min) before each timed block; 'idle-other' = busy cores seen "
          "while this process slept (only sampled when the 1-min load > 1.3); 'after' = 1-min load "
          "right after the block; 'others during' = cores used by other processes during the "
          "timed calls; 'own' = cores used by this process:")
    for entry in loadlog:
        label, la, busy, waited, after, others, own, attempt = entry
        btxt = "-" if busy is None else f"{busy:.2f}"
        print(f"  {label} (try {attempt}): {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}  idle-other {btxt}  "
              f"waited {waited}s  after {after:.2f}  others during {others:.2f}  own {own:.2f}")
    print("\nprobe details:")
    for n in notes:
        print("  " + n)


if __name__ == "__main__":
    main()
