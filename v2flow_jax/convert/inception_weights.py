"""Converts pytorch-fid's FID Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth`) to our safetensors file.

    python -m v2flow_jax.convert.inception_weights --pth=pt_inception-2015-12-05-6726825d.pth \\
        --out=fid_inception.safetensors

The .pth is a plain state dict with torchvision's `Inception3` names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_var`, ..., `fc.weight`). Our file holds one tensor per Flax variable,
named by its path (`params/Mixed_5b/branch1x1/conv/kernel`, `batch_stats/.../bn/var`), float32:
  * conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out);
  * BatchNorm weight / bias -> params scale / bias; running_mean / running_var -> batch_stats mean / var;
  * `num_batches_tracked` and the 1008-way `fc` classifier are dropped (FID reads pool3, before fc).
torch is needed here only, imported when a file is read; the pickle is opened with weights_only=True,
so nothing but tensors is ever unpickled. The FID network itself never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

import numpy as np

from v2flow_jax import atomic_files
from v2flow_jax.metrics import inception

FORMAT = "v2flow_jax.fid_inception_v3"
FID_NUM_CLASSES = 1008          # the TF graph's 1008 outputs; torchvision's ImageNet Inception has 1000
IGNORED_SUFFIXES = (".num_batches_tracked",)
DROPPED_PREFIXES = ("fc.",)
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
PTH_HINT = (f"pass the FID weights of pytorch-fid, pt_inception-2015-12-05-6726825d.pth ({inception.FID_WEIGHTS_URL})")


def torch_name(key: str) -> str:
    """'params/Mixed_5b/branch1x1/conv/kernel' -> 'Mixed_5b.branch1x1.conv.weight'."""
    parts = key.split(inception.KEY_SEPARATOR)[1:]          # drop the collection
    return ".".join(parts[:-1] + [_TORCH_LEAF[parts[-1]]])


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of one of our variables: HWIO -> OIHW, vectors unchanged."""
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def from_torch(array: np.ndarray) -> np.ndarray:
    """Inverse of `torch_shape` on the data (OIHW -> HWIO), as float32."""
    array = np.asarray(array, np.float32)
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array)


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch state-dict file as float32 numpy arrays (torch imported here only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise inception.InceptionWeightsError(f"{path!r} does not exist: {PTH_HINT}.")
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:       # torch raises several types for a bad or non-weights pickle
        raise inception.InceptionWeightsError(f"{path!r} is not a torch state dict that loads with "
                                              f"weights_only=True ({type(e).__name__}: {e}): {PTH_HINT}.") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]                     # a training checkpoint wrapping the weights
    if not isinstance(state, Mapping):
        raise inception.InceptionWeightsError(f"{path!r} holds a {type(state).__name__}, not a state dict: {PTH_HINT}.")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if torch.is_tensor(v)}


def _check_is_fid(state: Mapping[str, Any], source: str) -> None:
    # torchvision's ImageNet Inception-v3 has the same names and conv shapes: it would convert
    # silently and give FIDs comparable with nothing. Its tell-tales: AuxLogits and a 1000-way fc.
    aux = [k for k in state if k.startswith("AuxLogits.")]
    fc = state.get("fc.weight")
    if aux or (fc is not None and np.shape(fc)[0] != FID_NUM_CLASSES):
        what = f"{len(aux)} AuxLogits tensors" if aux else f"a {np.shape(fc)[0]}-way fc"
        raise inception.InceptionWeightsError(
            f"{source} has {what}: these are torchvision's ImageNet Inception-v3 weights, not the FID ones "
            f"(TensorFlow's 2015-12-05 graph, {FID_NUM_CLASSES} classes); FIDs from them are not comparable to "
            f"published numbers. Convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth instead "
            f"({inception.FID_WEIGHTS_URL}), or pass allow_other_weights=True (--allow-other-weights) to "
            f"accept these anyway.")


def convert_state_dict(state: Mapping[str, Any], source: str = "the state dict",
                       allow_other_weights: bool = False) -> dict[str, np.ndarray]:
    """torchvision-named FID Inception tensors -> our flat {'params/.../kernel': array} dict, checked."""
    if not allow_other_weights:
        _check_is_fid(state, source)
    used = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)
            and not k.startswith(DROPPED_PREFIXES) and not (allow_other_weights and k.startswith("AuxLogits."))}
    expected = inception.expected_variables()
    inception.check_tensors(used, expected, source, name_of=torch_name, shape_of=torch_shape, hint=PTH_HINT)
    return {key: from_torch(used[torch_name(key)]) for key in expected}


def save_safetensors(tensors: Mapping[str, np.ndarray], out: str | os.PathLike, source: str = "") -> str:
    """Writes our flat tensors atomically (a killed conversion never leaves half a file)."""
    from safetensors.numpy import save
    data = save(dict(tensors), metadata={"format": FORMAT, "source": os.path.basename(source)})
    return atomic_files.write_bytes(out, data)


def convert_file(pth: str | os.PathLike, out: str | os.PathLike, allow_other_weights: bool = False) -> dict[str, Any]:
    """pth -> out; returns a summary (tensor and parameter counts)."""
    pth = os.fspath(pth)
    tensors = convert_state_dict(read_pth(pth), source=repr(pth), allow_other_weights=allow_other_weights)
    path = save_safetensors(tensors, out, source=pth)
    params = sum(int(np.prod(v.shape)) for k, v in tensors.items() if k.startswith("params/"))
    return {"out": path, "tensors": len(tensors), "parameters": params}


def main(argv=None):
    """Convert pytorch-fid's FID Inception-v3 .pth into the safetensors file load_inception_params reads."""
    parser = argparse.ArgumentParser(prog="python -m v2flow_jax.convert.inception_weights", description=main.__doc__)
    parser.add_argument("--pth", required=True, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights)")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--allow-other-weights", action="store_true",
                        help="accept torchvision's ImageNet Inception-v3 weights too (FIDs then not comparable)")
    args = parser.parse_args(argv)
    try:
        summary = convert_file(args.pth, args.out, allow_other_weights=args.allow_other_weights)
    except inception.InceptionWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
