r"""ConvNeXt-T fine-tuned from ImageNet on SIPaKMeD, leak-free grouped folds.

Command (one test fold; fold 0 unless told), with the dataset built in the default place and
torchvision's ConvNeXt-T weights (ImageNet-1K, 82.5% top-1) fetched and converted once:

    python -m tfds_sipakmed.build --manual_dir=~/sipakmed
    python -m sipak_jax.convert --source=torchvision --arch=convnext_tiny --download \
        --input=convnext_tiny-983f1562.pth --output=weights/convnext_tiny
    python main.py --config=configs/convnext_tiny.py:fold=2 --workdir=workdirs/cnxt_fold2 \
        --config.init_from=weights/convnext_tiny

All five folds in turn, then their mean and standard deviation:

    python main.py --config=configs/convnext_tiny.py:fold=all --workdir=workdirs/cnxt_cv \
        --config.init_from=weights/convnext_tiny

timm's weights work the same way (`python -m sipak_jax.convert --source=timm
--arch=convnext_tiny --input=model.safetensors --output=weights/timm_convnext_tiny`, the file
from the hub repository `timm/convnext_tiny.fb_in1k` or `.in12k_ft_in1k`).

Everything but the model and the optimiser is `configs/resnet50.py`'s (this file builds on
it): the same grouped folds, validation split, 224 px padded crops, augmentation inside the
step, head-only epochs first, model selection on validation macro-F1, the test fold read
once, the same evaluators (calibration, test, shortcuts, artifacts, report).

The fine-tuning recipe, from the ConvNeXt paper's fine-tuning settings (Liu et al. 2022,
appendix A; they follow BEiT, Bao et al. 2022) scaled to a small dataset:
- AdamW, peak learning rate 1e-4 (the paper fine-tunes at 5e-5 with batch 512 on
  ImageNet; transfer to small datasets commonly uses 1e-4 at batch 64), weight decay 0.05 on
  kernels only (not on biases, LayerNorm or layer scale), cosine decay after 2 warm-up epochs;
- layer-wise learning-rate decay 0.8 (`optimizer.layer_decay`; the paper's value for
  ConvNeXt-T/S/B fine-tuning; BEiT uses 0.65-0.75 for ViTs): the stem learns at
  0.8^7 = 0.21 of the head's rate (ConvNeXt-T has 8 layer groups, `ConvNeXt.layer_id`), so
  the low-level ImageNet filters move least;
- stochastic depth 0.1 (`model.drop_path`, rising linearly to the last block; the paper uses
  0.1-0.2 for T at ImageNet scale and fine-tuning): a regulariser for a 4,000-image dataset;
- label smoothing 0.1 and gradient clipping at 1.0 as in the ResNet recipe; no EMA, no
  mixup/cutmix (the ResNet recipe has neither, and the comparison should be about the
  backbone).

Expected result (real SIPaKMeD, grouped 5-fold): not measured: the real data cannot be
downloaded on the machines this project was developed on, and nothing here has trained a
ConvNeXt on it. What is known: the conversion reproduces torchvision's and timm's logits
(tests/test_convert_convnext.py), and the recipe trains end to end (tests/test_convnext.py on
a synthetic SIPaKMeD). Published ConvNeXt results on SIPaKMeD use random cell-level splits
(which leak); expect a grouped result below those, as for ResNet-50. ConvNeXt-T has 28.6 M
parameters and costs about 4.5 GMAC per 224 px image forward (XLA counts 9.6 GFLOP forward,
28 GFLOP per training image; ResNet-50: 4.1 GMAC): a GPU job. On the 2-core CPU our training
step ran at about 1/3 of PyTorch's speed, inference at 1/1.45
(benchmarks/results/model_cpu_convnext_tiny_224.log).

Config arguments (`configs/convnext_tiny.py:key=value,...`): `fold` (0-4 or `all`). Other
sizes: `--config.model.size=small|base` with the matching `--arch`; `model.depths` /
`model.dims` override the size (tests use tiny ones).
"""

import ml_collections

from configs import resnet50
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, fold="0")
    config = resnet50.get_config(f"fold={args['fold']}")

    # ---- Model: ConvNeXt (sipak_jax.models.convnext), no ResNet fields --------------------
    for resnet_only in ("depth", "variant", "width", "stage_sizes"):
        if resnet_only in config.model:
            del config.model[resnet_only]
    config.model.name = "convnext"
    config.model.size = "tiny"  # 'tiny', 'small', 'base', 'large'
    config.model.depths = ml_collections.config_dict.placeholder(tuple)  # overrides size
    config.model.dims = ml_collections.config_dict.placeholder(tuple)  # overrides size
    config.model.drop_path = 0.1
    config.model.dropout_rate = 0.0
    config.init_from = "convnext_tiny-983f1562.pth"  # converted DIR or official file

    # ---- Optimisation ---------------------------------------------------------------------
    config.learning_rate = 1e-4
    config.head_learning_rate = 1e-3
    config.weight_decay = 0.05
    config.optimizer.layer_decay = 0.8
    return config
