"""Writes the LPIPS-VGG weights file that `v2flow_jax.metrics.lpips.load_lpips_params` reads.

Run once, from the two torch files LPIPS-VGG needs:
- torchvision's VGG16 ImageNet weights (`vgg16-397923af.pth`): a state dict whose conv layers sit at
  `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` (OIHW) and `.bias`; the classifier is unused;
- lpips' linear heads (`lpips/weights/v0.1/vgg.pth`): `lin{0..4}.model.1.weight`, shape (1, C, 1, 1).
When `--lpips_heads` is omitted, the heads shipped with an installed `lpips` package are used.

    python -m v2flow_jax.convert.lpips_weights --vgg16=PATH --lpips_heads=PATH --out=lpips_vgg.safetensors

torch is needed only here, imported inside `read_torch_file`, and only as `torch.load(weights_only=True)`
(no pickled code is executed). Output: conv kernels OIHW -> HWIO, heads (1, C, 1, 1) -> (C, 1), float32.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import numpy as np

from v2flow_jax import atomic_files
from v2flow_jax.metrics import lpips

# Positions of the 13 convs in torchvision's `vgg16().features` (the ReLUs and pools fill the gaps).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
HEADS_IN_PACKAGE = os.path.join("weights", "v0.1", "vgg.pth")
FILE_FORMAT = "v2flow_jax lpips-vgg v0.1"


class ConversionError(lpips.LPIPSWeightsError):
    """A source file that cannot be converted; the message names the file, the tensors and the fix."""


# --------------------------------------------------------------------------------------------------
# Reading the torch files


def read_torch_file(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """A torch state dict file as float32 numpy arrays, loaded with `weights_only=True`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{what} file {path!r} does not exist.")
    import torch  # only the converter needs torch, so only it imports it
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt or code-carrying pickle
        raise ConversionError(f"cannot read {what} file {path!r} as a torch state dict ({type(e).__name__}: "
                              f"{e}); re-download it (a file holding pickled code is refused).") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a training checkpoint wrapping the state dict
    if not isinstance(state, Mapping):
        raise ConversionError(f"{what} file {path!r} holds a {type(state).__name__}, not a state dict.")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def installed_heads_path() -> str | None:
    """lpips' own `weights/v0.1/vgg.pth`, if the package is installed (found without importing it,
    since importing lpips needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, HEADS_IN_PACKAGE)
        if os.path.isfile(candidate):
            return candidate
    return None


# --------------------------------------------------------------------------------------------------
# Mapping torch tensors onto ours


def _oihw(hwio: tuple[int, ...]) -> tuple[int, ...]:
    h, w, i, o = hwio
    return (o, i, h, w)


def _check(state: Mapping[str, np.ndarray], wanted: Mapping[str, tuple[int, ...]], source: str, hint: str) -> None:
    missing = [k for k in wanted if k not in state]
    wrong = [f"{k} has shape {tuple(state[k].shape)}, expected {wanted[k]}"
             for k in wanted if k in state and tuple(state[k].shape) != wanted[k]]
    problems = ([f"missing tensors: {lpips.name_listing(missing)}"] if missing else []) + \
               ([f"wrong shapes: {'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}"] if wrong else [])
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems) + f". {hint}")


def convert_vgg16(state: Mapping[str, np.ndarray], source: str = "the VGG16 state dict") -> dict[str, np.ndarray]:
    """torchvision VGG16 `features.*` tensors -> our flat `vgg/conv*` parameters (HWIO kernels)."""
    shapes = lpips.param_shapes()
    names = lpips.conv_names()
    wanted = {}
    for index, name in zip(TORCHVISION_CONV_INDICES, names):
        wanted[f"features.{index}.weight"] = _oihw(shapes[f"vgg/{name}/kernel"])
        wanted[f"features.{index}.bias"] = shapes[f"vgg/{name}/bias"]
    hint = "Use torchvision's plain VGG16 ImageNet weights (vgg16-397923af.pth)"
    if any(k.startswith("features.") and k.endswith("running_mean") for k in state):
        hint += "; this file has BatchNorm statistics, so it is vgg16_bn, which LPIPS does not use"
    _check(state, wanted, source, hint + ".")
    out = {}
    for index, name in zip(TORCHVISION_CONV_INDICES, names):
        out[f"vgg/{name}/kernel"] = np.ascontiguousarray(np.transpose(state[f"features.{index}.weight"], (2, 3, 1, 0)))
        out[f"vgg/{name}/bias"] = np.asarray(state[f"features.{index}.bias"])
    return out


def convert_heads(state: Mapping[str, np.ndarray], source: str = "the LPIPS heads state dict") -> dict[str, np.ndarray]:
    """lpips `lin{k}.model.1.weight` (1, C, 1, 1) -> our flat `lin{k}/kernel` (C, 1)."""
    wanted = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(lpips.tap_channels())}
    hint = "Use the lpips package's weights/v0.1/vgg.pth (the VGG heads, not alex.pth or squeeze.pth)."
    if "lin5.model.1.weight" in state:
        hint = "This file has seven heads, so it is the SqueezeNet one; " + hint
    _check(state, wanted, source, hint)
    return {f"lin{k}/kernel": np.asarray(state[key]).reshape(-1, 1) for k, key in enumerate(wanted)}


def convert(vgg16_state: Mapping[str, np.ndarray], heads_state: Mapping[str, np.ndarray],
            vgg16_source: str = "the VGG16 state dict",
            heads_source: str = "the LPIPS heads state dict") -> dict[str, np.ndarray]:
    """Both state dicts -> the complete flat float32 parameter dict `load_lpips_params` expects."""
    flat = {**convert_vgg16(vgg16_state, vgg16_source), **convert_heads(heads_state, heads_source)}
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    lpips.check_flat_params(flat, "the converted weights")  # guards the mapping itself
    return flat


def write_params(path: str | os.PathLike, flat: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> str:
    """Saves the flat parameters as safetensors, atomically (a killed run leaves no half file)."""
    from safetensors.numpy import save
    data = save(dict(flat), metadata={"format": FILE_FORMAT, **(metadata or {})})
    return atomic_files.write_bytes(path, data)


def convert_files(vgg16: str | os.PathLike, out: str | os.PathLike, lpips_heads: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reads the two torch files, converts and writes `out`; returns a summary (paths, tensor count)."""
    if lpips_heads is None:
        lpips_heads = installed_heads_path()
        if lpips_heads is None:
            raise ConversionError("no --lpips_heads given and no installed lpips package to take "
                                  f"{HEADS_IN_PACKAGE} from: pass --lpips_heads=PATH/vgg.pth, or "
                                  "`pip install --no-deps lpips==0.1.4`.")
    vgg16, lpips_heads = os.fspath(vgg16), os.fspath(lpips_heads)
    flat = convert(read_torch_file(vgg16, "VGG16 weights"), read_torch_file(lpips_heads, "LPIPS heads"),
                   vgg16_source=repr(vgg16), heads_source=repr(lpips_heads))
    metadata = {"vgg16": os.path.basename(vgg16), "lpips_heads": os.path.basename(lpips_heads)}
    path = write_params(out, flat, metadata)
    return {"out": path, "vgg16": vgg16, "lpips_heads": lpips_heads, "tensors": len(flat),
            "parameters": int(sum(v.size for v in flat.values()))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m v2flow_jax.convert.lpips_weights --vgg16=PATH [--lpips_heads=PATH] --out=PATH`."""
    import argparse
    import json
    parser = argparse.ArgumentParser(prog="python -m v2flow_jax.convert.lpips_weights",
                                     description="Converts torchvision VGG16 + lpips heads into one safetensors file.")
    parser.add_argument("--vgg16", required=True, help="torchvision's vgg16-397923af.pth (a VGG16 state dict)")
    parser.add_argument("--lpips_heads", default=None,
                        help=f"lpips' {HEADS_IN_PACKAGE}; default: the one in the installed lpips package")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        summary = convert_files(args.vgg16, args.out, args.lpips_heads)
    except lpips.LPIPSWeightsError as e:  # the message says what to do: no traceback
        parser.exit(1, f"error: {e}\n")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
